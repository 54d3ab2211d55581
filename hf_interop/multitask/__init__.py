"""Multi-task training with weighted losses: `MultiTaskConfig` + `MultiTaskTrainer`, the shared-backbone
`MultiTaskModel`, task sampling (`sampling.py`) and task weighting (`weighting.py`, pure functions)."""

from .config import MultiTaskConfig
from .heads import MultiTaskModel
from .sampling import TASK_SAMPLING_STRATEGIES, TaskBatchSampler, task_probabilities, task_schedule
from .trainer import MultiTaskTrainer
from .weighting import TASK_WEIGHTING_METHODS, pcgrad_combine, static_weighted_sum, uncertainty_weighted_sum

__all__ = [
    "TASK_SAMPLING_STRATEGIES",
    "TASK_WEIGHTING_METHODS",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskTrainer",
    "TaskBatchSampler",
    "pcgrad_combine",
    "static_weighted_sum",
    "task_probabilities",
    "task_schedule",
    "uncertainty_weighted_sum",
]
