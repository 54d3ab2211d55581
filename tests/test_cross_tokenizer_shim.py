"""The old path `hf_interop.cross_tokenizer` keeps working: each name is the object its new home defines."""

from __future__ import annotations

import importlib
import inspect

import pytest

MOVED = {
    "text_alignment": [
        "ALIGNMENT_MODES",
        "DEFAULT_MAX_VOCAB_UNION_SIZE",
        "AlignedSpan",
        "SpanAlignmentIndex",
        "TextAlignment",
        "VocabularyMapping",
        "align_texts",
        "align_token_offsets",
        "build_span_alignment_index",
        "build_vocabulary_mapping",
        "check_offsets_support",
        "special_token_ids",
        "split_texts_into_chunks",
        "token_byte_strings",
    ],
    "losses.cross_tokenizer": [
        "DEFAULT_MATCHED_WEIGHT",
        "DEFAULT_UNMATCHED_WEIGHT",
        "MATCHED_LOSS_TYPES",
        "SPAN_LOSS_TYPES",
        "CrossTokenizerDistillationOutput",
        "CrossTokenizerLossOutput",
        "cross_tokenizer_distillation_loss",
        "matched_vocabulary_divergence",
        "span_aligned_distillation_loss",
        "uld_distance",
        "uld_loss",
    ],
    "distill.cross_tokenizer_collator": ["CrossTokenizerDistillationCollator"],
    "distill.cross_tokenizer_config": ["CROSS_TOKENIZER_LOSS_TYPES", "CrossTokenizerDistillationConfig"],
    "distill.cross_tokenizer_trainer": ["CrossTokenizerDistillationTrainer"],
    "loading": [
        "GPT2_EOS_TOKEN",
        "GPT2_SPLIT_PATTERN",
        "GPT2_TOKENIZER_DIRNAME",
        "GPT2_VOCAB_SIZE",
        "_gpt2_tiktoken_file",
        "load_gpt2_tokenizer",
    ],
}


@pytest.mark.parametrize(("home", "name"), [(home, name) for home, names in MOVED.items() for name in names])
def test_old_cross_tokenizer_path_reexports_the_moved_name(home, name):
    old = importlib.import_module("hf_interop.cross_tokenizer")
    new = importlib.import_module(f"hf_interop.{home}")
    assert getattr(old, name) is getattr(new, name)
    value = getattr(new, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == new.__name__  # defined there, not re-exported from somewhere else


def test_the_shim_exports_nothing_else():
    old = importlib.import_module("hf_interop.cross_tokenizer")
    exported = {name for name in vars(old) if not name.startswith("__")}
    assert exported == {name for names in MOVED.values() for name in names}
