"""Distillation: the config and trainer pairs, collators, the teacher cache, student initialisation.

Names are imported when first used, so `import hf_interop.distill` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .distillation_config import DistillationConfig
    from .distillation_trainer import DistillationTrainer
    from .student_init import init_student_from_teacher
    from .teacher_cache import TeacherLogitsCache, cache_teacher_logits

# public name -> module of this package that defines it
_LAZY_IMPORTS: dict[str, str] = {
    "DistillationConfig": "distillation_config",
    "DistillationTrainer": "distillation_trainer",
    "cache_teacher_logits": "teacher_cache.writer",
    "TeacherLogitsCache": "teacher_cache.reader",
    "init_student_from_teacher": "student_init",
}

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "TeacherLogitsCache",
    "cache_teacher_logits",
    "init_student_from_teacher",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
