"""Moved to `hf_interop.distill.student_init`; this path keeps working."""

from .distill.student_init import (  # noqa: F401
    LAYER_SELECTIONS,
    SUPPORTED_MODEL_TYPES,
    WIDTH_IMPORTANCES,
    init_student_from_teacher,
    select_layers,
)
