"""Knowledge-distillation losses over next-token distributions: dense, chunked, and against a cached sparse teacher."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import HIDDEN_LOSS_TYPES, LOSS_TYPES, SPARSE_LOSS_TYPES

if TYPE_CHECKING:
    from .chunked import chunked_distillation_loss
    from .dense import DistillationLossOutput, distillation_loss
    from .divergences import token_divergence
    from .heads import OutputHead, output_logits_fn
    from .sparse import chunked_sparse_distillation_loss, sparse_distillation_loss

# name -> the file of this package that defines it, imported on first use: `losses.names` (what configs import)
# and the package itself stay torch-free
_LAZY_IMPORTS: dict[str, str] = {
    "token_divergence": "divergences",
    "DistillationLossOutput": "dense",
    "distillation_loss": "dense",
    "chunked_distillation_loss": "chunked",
    "sparse_distillation_loss": "sparse",
    "chunked_sparse_distillation_loss": "sparse",
    "OutputHead": "heads",
    "output_logits_fn": "heads",
    # private names that the tests use
    "_ALL_IGNORED_WARNING": "dense",
    "_row_dot": "divergences",
}

__all__ = [
    "HIDDEN_LOSS_TYPES",
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
