"""The `hf-interop` command: every subcommand on tiny models, in-process, plus one real console-script call."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tiny_causal_lm

from hf_interop.cli import EXIT_BAD_INPUT, EXIT_OK, build_parser, main

SUBCOMMANDS = (
    "distill",
    "distill-multi",
    "adapt",
    "ensemble",
    "merge",
    "cache-teacher",
    "multitask",
    "compare",
    "card",
    "demo",
    "bag",
    "boost",
)


@pytest.fixture(scope="module")
def second_seed_dir(tmp_path_factory, corpus_tokenizer):
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer)
    folder = tmp_path_factory.mktemp("cli_llama_seed1")
    model.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


def _one_error_line(capsys) -> str:
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-interop")]
    assert len(err_lines) == 1, err_lines
    return err_lines[0]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_exists_and_documents_every_option():
    subparsers = _subparsers()
    assert set(SUBCOMMANDS) | {"lm-eval"} == set(subparsers)  # lm-eval passes its options to lm_eval (own --help)
    for name, parser in subparsers.items():
        for action in parser._actions:
            assert action.help, f"`hf-interop {name}` option {action.option_strings or action.dest} has no help text"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_exits_zero(command, capsys):
    assert main([command, "--help"]) == EXIT_OK
    assert "usage: hf-interop" in capsys.readouterr().out


def test_compare_prints_table_and_writes_report(tiny_model_dirs, second_seed_dir, tmp_path, capsys):
    output_dir = tmp_path / "cmp"
    argv = ["compare", str(tiny_model_dirs["llama"]), str(second_seed_dir), "--max_documents", "1"]
    argv += ["--block_size", "64", "--no_progress", "--output_dir", str(output_dir), "--names", "a", "b"]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "| a " in out and "mixture ensemble of a, b" in out
    report = json.loads((output_dir / "report.json").read_text())
    assert report["names"] == ["a", "b"] and report["top1_agreement"][0][0] == 1.0
    # Same command again: refused (exit 2, one line naming the flag), the first report untouched.
    assert main(argv) == EXIT_BAD_INPUT
    assert "--overwrite_output_dir" in _one_error_line(capsys)
    assert json.loads((output_dir / "report.json").read_text()) == report
    assert main([*argv, "--overwrite_output_dir"]) == EXIT_OK


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "at least 2 checkpoints"),
        (["B", "--block_size", "ten"], "invalid int value: 'ten'"),
        (["B", "--block_size", "1"], "--block_size must be >= 2"),
        (["B", "--dataset", "nowhere.xyz"], "neither 'builtin'"),
        (["/no/such/ckpt"], "does not exist"),
    ],
)
def test_compare_bad_input_exit_2_with_one_line(tiny_model_dirs, second_seed_dir, capsys, extra, message):
    extra = [str(second_seed_dir) if item == "B" else item for item in extra]
    assert main(["compare", str(tiny_model_dirs["llama"]), *extra]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_console_script_exit_codes(tiny_model_dirs, tmp_path):
    """The installed `hf-interop` script, as a shell script sees it: exit 2 + one error line for bad input."""
    script = shutil.which("hf-interop", path=str(Path(sys.executable).parent))
    assert script is not None, "the hf-interop console script is not installed next to this Python"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([script, "compare", str(tiny_model_dirs["llama"])], capture_output=True, text=True, env=env)
    assert bad.returncode == EXIT_BAD_INPUT
    assert bad.stderr.strip().splitlines()[-1].startswith("hf-interop compare: error: compare needs at least 2")
    ok = subprocess.run([script, "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == EXIT_OK and all(name in ok.stdout for name in SUBCOMMANDS)


def test_recipe_subcommands_document_every_option():
    """`hf-interop distill --help` etc. come from the recipes' dataclass parsers: every option has help text."""
    from hf_interop.cli import RECIPES, _recipe_parser

    for name, (dataclass_types, _, description) in RECIPES.items():
        parser = _recipe_parser(dataclass_types(), f"hf-interop {name}", description)
        undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
        # TrainingArguments documents its fields in its docstring, not as argparse help: only our own must have it.
        ours = {f.name for t in dataclass_types() if t.__module__.startswith("hf_interop") for f in _fields_of(t)}
        assert not [d for d in undocumented if d in ours], (name, undocumented)


def _fields_of(dataclass_type):
    import dataclasses

    own = set(getattr(dataclass_type, "__annotations__", {}))
    return [f for f in dataclasses.fields(dataclass_type) if f.name in own]


def test_distill_through_cli_and_its_errors(tiny_model_dirs, second_seed_dir, tmp_path, capsys):
    output_dir = tmp_path / "student"
    argv = ["distill", "--student_model_name_or_path", str(second_seed_dir)]
    argv += ["--teacher_model_name_or_path", str(tiny_model_dirs["llama"]), "--output_dir", str(output_dir)]
    argv += ["--max_steps", "1", "--block_size", "32", "--max_train_blocks", "4", "--eval_split", "none"]
    argv += ["--disable_tqdm", "true", "--report_to", "none"]
    assert main(argv) == EXIT_OK
    assert f"hf-interop distill: wrote {output_dir}" in capsys.readouterr().out
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()
    # Again without --overwrite_output_dir: exit 2, one line, before any model loads.
    assert main(argv) == EXIT_BAD_INPUT
    assert "--overwrite_output_dir" in _one_error_line(capsys)
    # A flag of the wrong type: argparse's one line, exit 2.
    assert main(["distill", "--max_steps", "many"]) == EXIT_BAD_INPUT
    assert "invalid int value: 'many'" in capsys.readouterr().err
    # Neither a student nor a layer count: exit 2 naming both options.
    bad = [
        "distill",
        "--teacher_model_name_or_path",
        str(tiny_model_dirs["llama"]),
        "--output_dir",
        str(tmp_path / "x"),
    ]
    assert main(bad) == EXIT_BAD_INPUT
    assert "student_model_name_or_path" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()
    # A teacher that does not exist: named before anything loads.
    missing = ["distill", "--student_model_name_or_path", str(second_seed_dir), "--output_dir", str(tmp_path / "y")]
    assert main([*missing, "--teacher_model_name_or_path", "./no/such/teacher"]) == EXIT_BAD_INPUT
    assert "teacher_model_name_or_path './no/such/teacher' does not exist" in _one_error_line(capsys)


def test_card_subcommand(tmp_path, capsys):
    folder = tmp_path / "my-student"
    folder.mkdir()
    argv = ["card", str(folder), "--kind", "distilled", "--teachers", "HuggingFaceTB/SmolLM2-135M-Instruct@abc123"]
    argv += ["--metrics", '{"perplexity": 21.5}', "--datasets", "builtin"]
    assert main(argv) == EXIT_OK
    from hf_interop.model_card import read_card_lineage

    lineage = read_card_lineage(folder)
    assert lineage["teachers"][0] == {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"}
    assert "my-student" in (folder / "README.md").read_text()
    capsys.readouterr()
    assert main(argv) == EXIT_BAD_INPUT and "--overwrite" in _one_error_line(capsys)
    assert main([*argv, "--overwrite"]) == EXIT_OK
    assert main(["card", str(folder), "--kind", "distiled"]) == EXIT_BAD_INPUT
    assert "'distiled' is not a card kind" in _one_error_line(capsys)
    assert main(["card", str(folder), "--kind", "merged", "--metrics", "{oops"]) == EXIT_BAD_INPUT
    assert "--metrics" in _one_error_line(capsys)


def test_staged_output_dir_replaces_only_on_success(tmp_path):
    from hf_interop.cli import staged_output_dir

    target = tmp_path / "run"
    with staged_output_dir(target) as stage:
        assert stage.name == "run" and not target.exists()  # the staging folder carries the final name
        (stage / "weights").write_text("first")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        with staged_output_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with staged_output_dir(target, overwrite=True) as stage:
            (stage / "weights").write_text("half")
            raise RuntimeError("killed mid-run")
    assert (target / "weights").read_text() == "first"
    with staged_output_dir(target, overwrite=True) as stage:
        (stage / "weights").write_text("second")
    assert (target / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_killed_run_leaves_no_partial_output(tiny_model_dirs, second_seed_dir, tmp_path):
    """SIGTERM in the middle of training before any checkpoint: exit code 1, one `interrupted` line, no output and no
    staging folder (there is nothing to resume; test_cli_faults.py covers runs with checkpoints)."""
    import signal
    import threading
    import time

    script = shutil.which("hf-interop", path=str(Path(sys.executable).parent))
    argv = [script, "distill", "--student_model_name_or_path", str(second_seed_dir)]
    argv += ["--teacher_model_name_or_path", str(tiny_model_dirs["llama"]), "--output_dir", str(tmp_path / "run")]
    argv += ["--max_steps", "100000", "--block_size", "32", "--max_train_blocks", "8", "--eval_split", "none"]
    argv += ["--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no"]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    stdout_lines: list[str] = []
    reader = threading.Thread(target=lambda: stdout_lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # Kill it once training has logged a step (the staging folder exists and holds a loaded student).
        while time.monotonic() < deadline and process.poll() is None and not any("'loss'" in x for x in stdout_lines):
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert [p.name for p in tmp_path.iterdir()] == [".incomplete-run"], "no staging folder"
        process.send_signal(signal.SIGTERM)
        stderr = process.stderr.read()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "hf-interop distill: interrupted"
    assert list(tmp_path.iterdir()) == []
