"""Moved to `hf_interop.distill.distillation_config`; this path keeps working."""

from .distill.distillation_config import (  # noqa: F401
    DISTILLATION_LOSS_TYPES,
    HIDDEN_LOSS_TYPES,
    SPARSE_TAIL_TYPES,
    DistillationConfig,
)
