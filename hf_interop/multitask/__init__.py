"""Multi-task training with weighted losses: `MultiTaskConfig` + `MultiTaskTrainer`, the shared-backbone
`MultiTaskModel`, task sampling (`sampling.py`) and task weighting (`weighting.py`, pure functions).

Names are imported on first use, so the pure `weighting` module (which the distillation losses share) loads without
transformers' Trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_IMPORTS = {
    "MultiTaskConfig": "config",
    "MultiTaskModel": "heads",
    "MultiTaskTrainer": "trainer",
    "TASK_SAMPLING_STRATEGIES": "sampling",
    "TaskBatchSampler": "sampling",
    "task_probabilities": "sampling",
    "task_schedule": "sampling",
    "TASK_WEIGHTING_METHODS": "weighting",
    "pcgrad_combine": "weighting",
    "static_weighted_sum": "weighting",
    "uncertainty_weighted_sum": "weighting",
}

__all__ = sorted(_LAZY_IMPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_interop.multitask' has no attribute {name!r}")
