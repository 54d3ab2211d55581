"""Knowledge-distillation losses over next-token distributions: dense, chunked, and against a cached sparse teacher."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sparse import (
        LOSS_TYPES,
        SPARSE_LOSS_TYPES,
        DistillationLossOutput,
        OutputHead,
        chunked_distillation_loss,
        chunked_sparse_distillation_loss,
        distillation_loss,
        output_logits_fn,
        sparse_distillation_loss,
        token_divergence,
    )

# name -> the file of this package that defines it, imported on first use
_LAZY_IMPORTS: dict[str, str] = {
    "LOSS_TYPES": "sparse",
    "SPARSE_LOSS_TYPES": "sparse",
    "token_divergence": "sparse",
    "DistillationLossOutput": "sparse",
    "distillation_loss": "sparse",
    "chunked_distillation_loss": "sparse",
    "sparse_distillation_loss": "sparse",
    "chunked_sparse_distillation_loss": "sparse",
    "OutputHead": "sparse",
    "output_logits_fn": "sparse",
    # private names that the tests use
    "_ALL_IGNORED_WARNING": "sparse",
    "_row_dot": "sparse",
}

__all__ = [
    "LOSS_TYPES",
    "SPARSE_LOSS_TYPES",
    "DistillationLossOutput",
    "OutputHead",
    "chunked_distillation_loss",
    "chunked_sparse_distillation_loss",
    "distillation_loss",
    "output_logits_fn",
    "sparse_distillation_loss",
    "token_divergence",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_IMPORTS))
