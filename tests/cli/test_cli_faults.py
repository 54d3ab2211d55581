"""Faults injected into real training commands: SIGTERM and SIGKILL of a running `hf-interop distill` / `adapt`
subprocess, and a failed final save. The checkpoints written so far survive in the folder the error names, the
output folder does not appear, a plain rerun refuses to delete them, and a rerun with `--resume_from_checkpoint true`
finishes with the weights of an uninterrupted run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_causal_lm
from safetensors.torch import load_file

from hf_interop.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, main
from hf_interop.utils import is_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, SAVE_STEPS = 6, 2
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dirs, corpus_tokenizer, corpus):
    """A tiny teacher, a differently seeded tiny student (same tokenizer) and a small text file."""
    root = tmp_path_factory.mktemp("fault_assets")
    student = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=1, tokenizer=corpus_tokenizer)
    student.save_pretrained(root / "student")
    corpus_tokenizer.save_pretrained(root / "student")
    text = "\n".join(" ".join(line.split()) for line in corpus["train"]["text"][:40] if line.strip())
    (root / "text.txt").write_text(text, encoding="utf-8")
    return {"teacher": str(tiny_model_dirs["llama"]), "student": str(root / "student"), "text": str(root / "text.txt")}


def _training_options(assets: dict, output_dir: Path) -> list[str]:
    # Gradient accumulation makes each optimizer step several forward/backward passes: the run lasts a few seconds,
    # long enough to be killed between its first checkpoint and its end on a fast machine too.
    return [
        "--dataset", assets["text"], "--eval_split", "none", "--block_size", "32", "--max_train_blocks", "32",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
        "--learning_rate", "1e-3", "--seed", "0", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]  # fmt: skip


def _distill_argv(assets: dict, output_dir: Path) -> list[str]:
    return [
        "distill",
        "--student_model_name_or_path",
        assets["student"],
        "--teacher_model_name_or_path",
        assets["teacher"],
        *_training_options(assets, output_dir),
    ]


def _adapt_argv(assets: dict, output_dir: Path) -> list[str]:
    return [
        "adapt",
        "--model_name_or_path",
        assets["student"],
        "--lora_r",
        "4",
        *_training_options(assets, output_dir),
    ]


def _staging(output_dir: Path) -> Path:
    return output_dir.parent / f".incomplete-{output_dir.name}" / output_dir.name


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)


def _kill_after_first_checkpoint(argv: list[str], output_dir: Path, kill_signal: int) -> tuple[int, str]:
    """Run `hf-interop ARGV` in a subprocess, send `kill_signal` once checkpoint-2 is complete; (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_interop.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # Complete = a readable trainer_state.json (Trainer writes it last); a half-written one is not yet complete.
    first_checkpoint = _staging(output_dir) / f"checkpoint-{SAVE_STEPS}"
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while process.poll() is None and not is_complete_checkpoint(first_checkpoint) and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before checkpoint-{SAVE_STEPS} could be seen")
        assert is_complete_checkpoint(first_checkpoint), f"no checkpoint-{SAVE_STEPS} after {KILL_TIMEOUT_S} s"
        process.send_signal(kill_signal)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


def _assert_resumable_state(output_dir: Path, argv: list[str], capsys) -> str:
    """The checkpoints survive, the output does not exist, and a plain rerun refuses naming both flags."""
    stage = _staging(output_dir)
    assert not output_dir.exists(), "an interrupted run must not leave an output folder"
    checkpoints = sorted(p.name for p in stage.iterdir() if p.name.startswith("checkpoint-"))
    assert f"checkpoint-{SAVE_STEPS}" in checkpoints, checkpoints
    capsys.readouterr()
    before = sorted(p.name for p in stage.iterdir())
    assert main(argv) == EXIT_BAD_INPUT
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-interop")]
    assert str(stage) in line and "--resume_from_checkpoint true" in line and "--overwrite_output_dir" in line, line
    assert sorted(p.name for p in stage.iterdir()) == before, "the refused rerun must not touch the checkpoints"
    return line


def _resume(argv: list[str], output_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main([*argv, "--resume_from_checkpoint", "true"]) == EXIT_OK, capsys.readouterr().err[-2000:]
    assert (output_dir / f"checkpoint-{MAX_STEPS}").is_dir(), "the checkpoints move into the output folder"
    assert not _staging(output_dir).parent.exists(), "nothing is left of the staging folder after success"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, assets):
    """Final weights of runs that nobody interrupted (in-process), per command."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main(_distill_argv(assets, root / "distill")) == EXIT_OK
    assert main(_adapt_argv(assets, root / "adapt")) == EXIT_OK
    return {
        "distill": _weights(root / "distill", "model.safetensors"),
        "adapt": _weights(root / "adapt", "adapter_model.safetensors"),
    }


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_distill_keeps_checkpoints_and_resumes_to_the_same_weights(
    kill_signal, assets, uninterrupted, tmp_path, capsys
):
    output_dir = tmp_path / "student"
    argv = _distill_argv(assets, output_dir)
    returncode, stderr = _kill_after_first_checkpoint(argv, output_dir, kill_signal)
    if kill_signal == signal.SIGTERM:
        assert returncode == EXIT_FAILURE, stderr[-2000:]
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("hf-interop distill: interrupted; kept checkpoints in "), last_line
        assert str(_staging(output_dir)) in last_line and "--resume_from_checkpoint true" in last_line
    else:
        assert returncode == -signal.SIGKILL
    _assert_resumable_state(output_dir, argv, capsys)
    _resume(argv, output_dir, capsys)
    _assert_same_weights(_weights(output_dir, "model.safetensors"), uninterrupted["distill"])


def test_sigterm_of_adapt_keeps_checkpoints_and_resumes_to_the_same_adapter(assets, uninterrupted, tmp_path, capsys):
    output_dir = tmp_path / "adapter"
    argv = _adapt_argv(assets, output_dir)
    returncode, stderr = _kill_after_first_checkpoint(argv, output_dir, signal.SIGTERM)
    assert returncode == EXIT_FAILURE, stderr[-2000:]
    assert "hf-interop adapt: interrupted; kept checkpoints in" in stderr.strip().splitlines()[-1]
    _assert_resumable_state(output_dir, argv, capsys)
    _resume(argv, output_dir, capsys)
    _assert_same_weights(_weights(output_dir, "adapter_model.safetensors"), uninterrupted["adapt"])


def test_failed_final_save_keeps_checkpoints_and_names_them(assets, uninterrupted, tmp_path, capsys, monkeypatch):
    """A full disk at the final save (after every checkpoint was written): exit 1, one line naming the error and the
    folder; the resumed run saves the same weights. `--overwrite_output_dir` starts afresh."""
    from hf_interop import DistillationTrainer

    original_save_model = DistillationTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if output_dir is None:  # the final save; checkpoints pass their folder
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save_model(self, output_dir, _internal_call=_internal_call)

    output_dir = tmp_path / "student"
    argv = _distill_argv(assets, output_dir)
    monkeypatch.setattr(DistillationTrainer, "save_model", save_model)
    assert main(argv) == EXIT_FAILURE
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-interop")]
    assert line.startswith("hf-interop distill: error: OSError: [Errno 28] No space left on device; kept checkpoints")
    assert f"(last: checkpoint-{MAX_STEPS})" in line and str(_staging(output_dir)) in line
    _assert_resumable_state(output_dir, argv, capsys)
    monkeypatch.setattr(DistillationTrainer, "save_model", original_save_model)
    _resume(argv, output_dir, capsys)
    _assert_same_weights(_weights(output_dir, "model.safetensors"), uninterrupted["distill"])


def test_overwrite_output_dir_starts_afresh_over_kept_checkpoints(assets, tmp_path, capsys):
    """The other way out of the refusal: `--overwrite_output_dir` deletes the kept checkpoints and trains anew."""
    output_dir = tmp_path / "student"
    stale = _staging(output_dir) / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text('{"global_step": 4}')
    argv = _distill_argv(assets, output_dir)
    assert main(argv) == EXIT_BAD_INPUT
    assert "(last: checkpoint-4)" in capsys.readouterr().err
    assert main([*argv, "--max_steps", "2", "--overwrite_output_dir"]) == EXIT_OK
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not _staging(output_dir).parent.exists()
