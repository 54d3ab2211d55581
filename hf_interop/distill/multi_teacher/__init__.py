"""Multi-teacher distillation: one student, several teachers, each example routed to one or taught by a mixture."""

from __future__ import annotations

from .combination import combine_teacher_log_probs, sequence_confidence_scores, teacher_weights_per_example
from .config import MultiTeacherDistillationConfig

__all__ = [
    "MultiTeacherDistillationConfig",
    "MultiTeacherDistillationTrainer",
    "combine_teacher_log_probs",
    "sequence_confidence_scores",
    "teacher_weights_per_example",
]


def __getattr__(name: str):
    if name == "MultiTeacherDistillationTrainer":
        from .trainer import MultiTeacherDistillationTrainer

        return MultiTeacherDistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
