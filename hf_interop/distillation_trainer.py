"""Moved to `hf_interop.distill.distillation_trainer`; this path keeps working."""

from .distill.collators import (  # noqa: F401
    IGNORE_INDEX,
    TEACHER_CACHE_COLUMNS,
    _left_padded_prompts,
    _PaddingCollator,
    _TeacherCacheCollator,
    mask_generated_continuations,
)
from .distill.distillation_trainer import LOGGED_METRICS, DistillationTrainer  # noqa: F401
from .distill.hidden_states import PROJECTIONS_FILE  # noqa: F401
from .distill.model_utils import _tokenizer_next_to, _vocab_size  # noqa: F401
