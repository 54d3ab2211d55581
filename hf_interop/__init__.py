"""hf_interop: make language-model checkpoints work together.

Distillation, adaptation, ensembles and merges on top of Hugging Face Transformers. The public API is listed
in `__all__`; heavy libraries (torch, transformers, datasets) are imported only when a name is first used, so
`import hf_interop` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_IMPORTS: dict[str, str] = {
    # loading and data
    "load_causal_lm": "loading",
    "load_tokenizer": "loading",
    "load_default_teacher": "loading",
    "default_teacher_path": "loading",
    "load_gemma3_270m": "loading",
    "gemma3_270m_path": "loading",
    "dequantize_gguf_model": "loading",
    "ModelLoadingError": "errors",
    "load_builtin_corpus": "data",
    "pack_dataset": "data",
    "evaluate_perplexity": "evaluation",
    # distillation
    "DistillationConfig": "distill.distillation_config",
    "DistillationTrainer": "distill.distillation_trainer",
    "cache_teacher_logits": "distill.teacher_cache.writer",
    "TeacherLogitsCache": "distill.teacher_cache.reader",
    "ServedTeacher": "distill.served_teacher.client",
    "ServedTeacherError": "distill.served_teacher.client",
    # fusion
    "EnsembleConfig": "ensemble.config",
    "EnsembleForCausalLM": "ensemble.causal_lm",
    "EnsembleForSequenceClassification": "ensemble.classification",
    "fit_ensemble_weights": "ensemble.weights",
    "BaggingConfig": "ensemble.bagging",
    "BaggingTrainer": "ensemble.bagging",
    "BoostingConfig": "ensemble.boosting",
    "BoostingTrainer": "ensemble.boosting",
    "merge_checkpoints": "merge.checkpoints",
    "greedy_soup": "merge.soup",
    "merge_lora_adapters": "merge.lora",
    # adaptation
    "build_lora_config": "adapters",
    "export_merged_model": "adapters",
    "init_student_from_teacher": "distill.student_init",
    # around it
    "render_model_card": "hub.cards",
    "write_model_card": "hub.cards",
    "push_output_to_hub": "hub.push",
    "write_lineage_manifest": "hub.lineage",
    "check_hub_access": "hub.push",
    "compare_checkpoints": "compare",
    "run_demo": "demo",
    # across tokenizers
    "load_gpt2_tokenizer": "loading",
    "CrossTokenizerDistillationConfig": "distill.cross_tokenizer_config",
    "CrossTokenizerDistillationTrainer": "distill.cross_tokenizer_trainer",
    "CrossTokenizerEnsemble": "ensemble.cross_tokenizer",
    # speculative ensemble decoding
    "SpeculativeGenerateOutput": "ensemble.speculative",
    # several teachers, one student
    "MultiTeacherDistillationConfig": "distill.multi_teacher.config",
    "MultiTeacherDistillationTrainer": "distill.multi_teacher.trainer",
    "combine_teacher_log_probs": "distill.multi_teacher.combination",
    # merges that fit their own coefficients
    "fit_merge_coefficients": "merge.fitting",
    # multi-task training with weighted losses
    "MultiTaskConfig": "multitask.config",
    "MultiTaskTrainer": "multitask.trainer",
    "MultiTaskModel": "multitask.heads",
}

_SUBMODULES = {
    "losses",
    "distill",
    "callbacks",
    "metrics",
    "loading",
    "safetensors_checks",
    "errors",
    "data",
    "evaluation",
    "ensemble",
    "merge",
    "multitask",
    "adapters",
    "student_init",
    "teacher_cache",
    "model_card",
    "hub",
    "compare",
    "cross_tokenizer",
    "text_alignment",
    "cli",
    "demo",
    "distillation_config",
    "distillation_trainer",
    "cross_tokenizer_ensemble",
    "logging_utils",
    "utils",
}

__all__ = sorted([*_LAZY_IMPORTS, "losses", "callbacks", "metrics", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        module = importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hf_interop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
