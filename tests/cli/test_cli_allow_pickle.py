"""`--allow_pickle`: every command that loads checkpoints refuses pickle-only weights by default, names the flag, and
loads them with it (students, teachers, a student built from a teacher, adapted models, members, compared models)."""

from __future__ import annotations

import pytest
import torch

from hf_interop.cli import EXIT_BAD_INPUT, EXIT_OK, build_parser, main

TINY_DATA = ["--block_size", "32", "--max_train_blocks", "4", "--eval_split", "none"]
TINY_TRAINING = ["--max_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory, tiny_model_dirs):
    """The tiny Llama saved with pickle weights only (pytorch_model.bin), as older checkpoints are."""
    from hf_interop import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dirs["llama"])
    folder = tmp_path_factory.mktemp("pickle_llama")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def _commands(pickled: str, plain: str, output_dir: str) -> dict[str, list[str]]:
    out = ["--output_dir", output_dir]
    return {
        "compare": ["compare", pickled, plain, "--max_documents", "1", "--block_size", "32", "--no_progress"],
        "distill-student": ["distill", "--student_model_name_or_path", pickled, "--teacher_model_name_or_path", plain]
        + [*out, *TINY_DATA, *TINY_TRAINING],
        "distill-teacher": ["distill", "--student_model_name_or_path", plain, "--teacher_model_name_or_path", pickled]
        + [*out, *TINY_DATA, *TINY_TRAINING],
        "distill-built-from-teacher": ["distill", "--student_num_layers", "1", "--teacher_model_name_or_path", pickled]
        + [*out, *TINY_DATA, *TINY_TRAINING],
        "adapt": ["adapt", "--model_name_or_path", pickled, "--lora_r", "2", *out, *TINY_DATA, *TINY_TRAINING],
        "cache-teacher": ["cache-teacher", "--teacher_model_name_or_path", pickled, "--top_k", "4", *out, *TINY_DATA]
        + ["--disable_tqdm", "true"],
        "ensemble": ["ensemble", "--members", pickled, plain, "--eval_split", "none", *out],
    }


COMMANDS = list(_commands("P", "Q", "O"))


@pytest.mark.parametrize("case", COMMANDS)
def test_pickle_weights_load_only_with_allow_pickle(case, pickle_dir, tiny_model_dirs, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = _commands(pickle_dir, str(tiny_model_dirs["llama"]), str(output_dir))[case]
    assert main(argv) == EXIT_BAD_INPUT
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-interop")]
    assert "holds only pickle weights" in line and "--allow_pickle" in line, line
    assert list(tmp_path.iterdir()) == [], "a refused load leaves nothing behind"
    assert main([*argv, "--allow_pickle"]) == EXIT_OK, capsys.readouterr().err[-2000:]
    if case != "compare":
        assert output_dir.is_dir()


def test_merge_has_no_allow_pickle_because_it_reads_safetensors_only(pickle_dir, tiny_model_dirs, tmp_path, capsys):
    """The merge streams safetensors; a pickle-only checkpoint is refused with the way to convert it, not a flag."""
    argv = ["merge", "--checkpoints", pickle_dir, str(tiny_model_dirs["llama"]), "--output_dir", str(tmp_path / "m")]
    assert main(argv) != EXIT_OK
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("hf-interop")]
    assert "has no *.safetensors weights" in line and "--allow_pickle" not in line
    assert main([*argv, "--allow_pickle"]) == EXIT_BAD_INPUT
    assert "unrecognized arguments: --allow_pickle" in capsys.readouterr().err


def test_every_command_that_loads_checkpoints_offers_allow_pickle():
    from hf_interop.cli import RECIPES, _recipe_parser

    parsers = {name: _recipe_parser(types(), name, "") for name, (types, _, _) in RECIPES.items()}
    parsers["compare"] = build_parser()._subparsers._group_actions[0].choices["compare"]
    for name in ("distill", "adapt", "cache-teacher", "ensemble", "compare"):
        (action,) = [a for a in parsers[name]._actions if a.dest == "allow_pickle"]
        assert action.default is False and "pickle" in action.help, name
