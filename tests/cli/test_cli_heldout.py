"""`--dataset FILE` gets a held-out split carved by document, or a separate `--eval_dataset` (issue: one file had none)."""

from __future__ import annotations

import pytest

from hf_interop.cli import RECIPES, parse_recipe_args
from hf_interop.cli.arguments import DataArguments
from hf_interop.cli.recipes import _load_blocks


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {index} says something about topic {index % 7} in plain words." for index in range(60)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def _distill_args(argv):
    argv = [*argv, "--student_num_layers", "1", "--output_dir", "unused"]
    parsed = parse_recipe_args(RECIPES["distill"][0](), argv, prog="hf-interop distill")
    script_args = parsed[0]
    DataArguments.check(script_args)  # the data options only: nothing else of the command is needed here
    return script_args


def test_one_file_gives_disjoint_train_and_validation_blocks(text_file, corpus_tokenizer):
    script_args = _distill_args(["--dataset", str(text_file), "--block_size", "8"])
    validation = _load_blocks(script_args, corpus_tokenizer, "validation", None)
    train = _load_blocks(script_args, corpus_tokenizer, "train", None)
    assert len(validation) > 0 and len(train) > len(validation)


def test_eval_dataset_and_percentage_reach_the_loader(text_file, tmp_path, corpus_tokenizer):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("A held out sentence that is only here.\n\nAnd a second one.", encoding="utf-8")
    script_args = _distill_args(["--dataset", str(text_file), "--eval_dataset", str(held_out), "--block_size", "4"])
    validation = _load_blocks(script_args, corpus_tokenizer, "validation", None)
    decoded = "".join(corpus_tokenizer.decode(ids) for ids in validation["input_ids"])
    assert "held out sentence" in decoded
    with pytest.raises(ValueError, match="validation_split_percentage"):
        _distill_args(["--dataset", str(text_file), "--validation_split_percentage", "150"])
