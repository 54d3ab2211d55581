"""The flat layout's module paths keep working: each re-exports the very objects of their new homes in distill/."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import hf_interop

# (old path, name, module that defines it now)
REEXPORTS = [
    *[
        ("hf_interop.distillation_config", name, "hf_interop.distill.distillation_config")
        for name in ("DistillationConfig", "DISTILLATION_LOSS_TYPES", "HIDDEN_LOSS_TYPES", "SPARSE_TAIL_TYPES")
    ],
    ("hf_interop.distillation_trainer", "DistillationTrainer", "hf_interop.distill.distillation_trainer"),
    ("hf_interop.distillation_trainer", "LOGGED_METRICS", "hf_interop.distill.distillation_trainer"),
    ("hf_interop.distillation_trainer", "PROJECTIONS_FILE", "hf_interop.distill.hidden_states"),
    *[
        ("hf_interop.distillation_trainer", name, "hf_interop.distill.collators")
        for name in (
            "IGNORE_INDEX",
            "TEACHER_CACHE_COLUMNS",
            "mask_generated_continuations",
            "_left_padded_prompts",
            "_PaddingCollator",
            "_TeacherCacheCollator",
        )
    ],
    # cross_tokenizer.py imports these two from the old path
    ("hf_interop.distillation_trainer", "_tokenizer_next_to", "hf_interop.distill.model_utils"),
    ("hf_interop.distillation_trainer", "_vocab_size", "hf_interop.distill.model_utils"),
    *[
        ("hf_interop.student_init", name, "hf_interop.distill.student_init")
        for name in (
            "init_student_from_teacher",
            "select_layers",
            "SUPPORTED_MODEL_TYPES",
            "LAYER_SELECTIONS",
            "WIDTH_IMPORTANCES",
        )
    ],
    ("hf_interop.teacher_cache", "cache_teacher_logits", "hf_interop.distill.teacher_cache.writer"),
    ("hf_interop.teacher_cache", "TeacherLogitsCache", "hf_interop.distill.teacher_cache.reader"),
    ("hf_interop.teacher_cache", "sparse_kl", "hf_interop.distill.teacher_cache.reader"),
    *[
        ("hf_interop.teacher_cache", name, "hf_interop.distill.teacher_cache.format")
        for name in (
            "CACHE_FORMAT_VERSION",
            "IDS_COLUMN",
            "LOGPROBS_COLUMN",
            "TAIL_COLUMN",
            "PLAN_FILE",
            "MANIFEST_FILE",
            "SHARD_DATA_FILE",
            "SHARD_INFO_FILE",
            "PAD_LOGPROB",
            "tokenizer_fingerprint",
            "dataset_fingerprint",
            "logprobs_to_float16_round_down",
            "tail_logprob_from_topk",
        )
    ],
]


@pytest.mark.parametrize(("old_path", "name", "home"), REEXPORTS, ids=[f"{old}:{name}" for old, name, _ in REEXPORTS])
def test_old_module_path_reexports_the_new_home(old_path, name, home):
    assert getattr(importlib.import_module(old_path), name) is getattr(importlib.import_module(home), name)


def test_teacher_cache_package_exports_every_name_of_the_old_module():
    package = importlib.import_module("hf_interop.distill.teacher_cache")
    old = importlib.import_module("hf_interop.teacher_cache")
    for name in (name for path, name, _ in REEXPORTS if path == "hf_interop.teacher_cache"):
        assert getattr(package, name) is getattr(old, name)
        assert name in package.__all__


@pytest.mark.parametrize(
    "name",
    [
        "DistillationConfig",
        "DistillationTrainer",
        "TeacherLogitsCache",
        "cache_teacher_logits",
        "init_student_from_teacher",
    ],
)
def test_distill_package_names_are_the_public_ones(name):
    distill = importlib.import_module("hf_interop.distill")
    assert name in distill.__all__
    assert getattr(distill, name) is getattr(hf_interop, name)


def test_importing_the_distill_package_does_not_load_torch():
    code = "import sys, hf_interop.distill; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
