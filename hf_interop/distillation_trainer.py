"""Moved to `hf_interop.distill.distillation_trainer`; this path keeps working."""

from .distill.distillation_trainer import (  # noqa: F401
    IGNORE_INDEX,
    LOGGED_METRICS,
    PROJECTIONS_FILE,
    TEACHER_CACHE_COLUMNS,
    DistillationTrainer,
    _left_padded_prompts,
    _PaddingCollator,
    _TeacherCacheCollator,
    _tokenizer_next_to,
    _vocab_size,
    mask_generated_continuations,
)
