"""Configuration of :class:`~hf_interop.MultiTaskTrainer`: a `TrainingArguments` with task sampling and weighting."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .sampling import TASK_SAMPLING_STRATEGIES, check_temperature
from .weighting import TASK_WEIGHTING_METHODS


def _json_mapping(value: Any, argument: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{argument}={value!r} is not valid JSON ({error}); give e.g. '{{\"task\": 1.0}}'."
            ) from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"{argument}={value!r} must be a mapping of task name to value, e.g. {{'python_docs': 1.0}}.")


@dataclass
class MultiTaskConfig(TrainingArguments):
    r"""
    Configuration of [`MultiTaskTrainer`]: everything [`~transformers.TrainingArguments`] holds, plus how tasks are
    sampled and how their losses are weighted.

    Args:
        task_sampling (`str`, *optional*, defaults to `"proportional"`):
            Which task each step trains on: `"proportional"` (probability in proportion to the task's rows),
            `"temperature"` (proportional to rows^(1/`sampling_temperature`), T5/mT5), `"round_robin"` (tasks in
            turn) or `"all"` (a batch of every task in every step; required by `task_weighting="pcgrad"`). Every
            process draws the same task at a step.
        sampling_temperature (`float`, *optional*, defaults to `2.0`):
            Temperature `T` > 0 of `task_sampling="temperature"`: `1.0` is proportional, higher moves towards uniform
            and lifts small tasks.
        task_weighting (`str`, *optional*, defaults to `"static"`):
            `"static"` (the loss is `sum w_i L_i` with `task_weights`), `"uncertainty"` (learned log-variances,
            Kendall et al. https://huggingface.co/papers/1705.07115: `sum exp(-s_i) w_i L_i + s_i`; the `s_i` are
            trained with the model and saved in checkpoints) or `"pcgrad"` (conflicting task gradients projected
            apart, Yu et al. https://huggingface.co/papers/2001.06782; needs `task_sampling="all"`).
        task_weights (`dict[str, float]` or `str`, *optional*):
            Static weight (>= 0) of each task's loss, e.g. `{"python_docs": 1.0, "domain": 0.5}`; tasks left out
            weigh 1. A JSON string is accepted (command line). With `uncertainty` and `pcgrad` they scale each task's
            loss before the method applies.
        log_variance_learning_rate (`float`, *optional*):
            Learning rate of the log-variances of `task_weighting="uncertainty"` (their own optimizer group, no
            weight decay). Defaults to `learning_rate`; LoRA runs with few steps want a higher value (e.g. 0.05) so
            the weights move within the run.
        steps_per_epoch (`int`, *optional*):
            Optimizer steps that count as one epoch (each process draws `per_device_train_batch_size` rows per
            step). Defaults to the total rows of all tasks divided by the global batch.
    """

    task_sampling: str = field(
        default="proportional",
        metadata={"help": "proportional, temperature (sizes^(1/T)), round_robin, or all (every task every step)."},
    )
    sampling_temperature: float = field(
        default=2.0, metadata={"help": "T > 0 of task_sampling='temperature'; 1 is proportional, higher flattens."}
    )
    task_weighting: str = field(
        default="static", metadata={"help": "static (task_weights), uncertainty (learned), or pcgrad."}
    )
    task_weights: dict | str | None = field(
        default=None, metadata={"help": "Static weight per task (JSON mapping); unlisted tasks weigh 1."}
    )
    log_variance_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the uncertainty log-variances (default: learning_rate)."}
    )
    steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Steps per epoch (default: all tasks' rows / global batch)."}
    )
    # The batches hold a task name and per-task columns that no model signature lists; they must not be dropped.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the multi-task collator chooses the columns itself."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_sampling not in TASK_SAMPLING_STRATEGIES:
            raise ValueError(
                f"task_sampling={self.task_sampling!r} is not one of {list(TASK_SAMPLING_STRATEGIES)}; use e.g. "
                "'proportional'."
            )
        check_temperature(self.sampling_temperature)
        if self.task_weighting not in TASK_WEIGHTING_METHODS:
            raise ValueError(
                f"task_weighting={self.task_weighting!r} is not one of {list(TASK_WEIGHTING_METHODS)}; use e.g. "
                "'static'."
            )
        if self.task_weighting == "pcgrad" and self.task_sampling != "all":
            raise ValueError(
                f"task_weighting='pcgrad' compares the gradients of every task within one step, but "
                f"task_sampling={self.task_sampling!r} gives each step one task; set task_sampling='all'."
            )
        self.task_weights = _json_mapping(self.task_weights, "task_weights")
        for task, value in (self.task_weights or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"task_weights[{task!r}]={value!r} must be a finite number >= 0 (0 switches the task off)."
                )
        if self.log_variance_learning_rate is not None and not self.log_variance_learning_rate > 0:
            raise ValueError(f"log_variance_learning_rate={self.log_variance_learning_rate} must be > 0.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={self.steps_per_epoch} must be >= 1 (or unset).")
