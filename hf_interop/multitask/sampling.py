"""Which task each training step draws, and which rows: pure functions of the seed, the epoch and the task sizes.

Every process computes the same schedule from the same seed, so in a step all processes train on the same task
(DDP / FSDP stay in step: the same parameters receive gradients on every rank), and a resumed run draws exactly the
steps the uninterrupted one would have drawn.

- `proportional`: task `i` with probability `n_i / sum_j n_j` (`n` = rows);
- `temperature`: probability proportional to `n_i ** (1 / T)` (T5 / mT5, https://huggingface.co/papers/1910.10683):
  `T = 1` is proportional, larger `T` moves towards uniform and lifts small tasks;
- `round_robin`: tasks in turn, `step mod number_of_tasks`;
- `all`: every step holds a batch of every task (needed by gradient methods such as PCGrad, which compare the tasks'
  gradients within one step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

TASK_SAMPLING_STRATEGIES = ("proportional", "temperature", "round_robin", "all")


def check_temperature(temperature: float, argument: str = "sampling_temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"{argument}={temperature!r} must be a finite number > 0 (e.g. 2.0, T5's choice is 1/0.3).")
    if temperature <= 0:
        raise ValueError(
            f"{argument}={temperature} must be > 0: 1.0 samples in proportion to task sizes, larger values move "
            "towards uniform."
        )


def task_probabilities(sizes: Sequence[int], strategy: str, temperature: float = 1.0) -> list[float]:
    """The probability of drawing each task at a step, from the tasks' sizes (rows).

    `proportional`: `n_i / sum n`; `temperature`: `n_i^(1/T) / sum n^(1/T)`; `round_robin` and `all`: uniform (the
    long-run share of steps).
    """
    if not sizes or any(size <= 0 for size in sizes):
        raise ValueError(f"task sizes {list(sizes)} must all be > 0.")
    if strategy == "proportional":
        exponent = 1.0
    elif strategy == "temperature":
        check_temperature(temperature)
        exponent = 1.0 / temperature
    elif strategy in ("round_robin", "all"):
        return [1.0 / len(sizes)] * len(sizes)
    else:
        raise ValueError(f"task_sampling={strategy!r} is not one of {list(TASK_SAMPLING_STRATEGIES)}.")
    # in float64 and relative to the largest task, so huge sizes and high powers stay exact enough
    largest = max(sizes)
    masses = [(size / largest) ** exponent for size in sizes]
    total = math.fsum(masses)
    return [mass / total for mass in masses]


def task_schedule(
    sizes: Sequence[int], strategy: str, num_steps: int, seed: int, epoch: int = 0, temperature: float = 1.0
) -> list[int]:
    """The task index of each of `num_steps` steps of epoch `epoch` (for `all`: `-1`, every task every step)."""
    if strategy == "all":
        return [-1] * num_steps
    if strategy == "round_robin":
        return [step % len(sizes) for step in range(num_steps)]
    probabilities = torch.tensor(task_probabilities(sizes, strategy, temperature), dtype=torch.float64)
    generator = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
    return torch.multinomial(probabilities, num_steps, replacement=True, generator=generator).tolist()


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (stable across runs and processes, unlike `hash`)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class _RowStream:
    """The rows of one task in shuffled order, reshuffled (new seed) each time they run out."""

    def __init__(self, size: int, seed: int, epoch: int, task: int) -> None:
        self.size, self.seed, self.epoch, self.task = size, seed, epoch, task
        self.cycle, self.position, self.order = 0, 0, self._permutation(0)

    def _permutation(self, cycle: int) -> list[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.task, cycle))
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        rows = []
        while len(rows) < count:
            if self.position == self.size:
                self.cycle, self.position = self.cycle + 1, 0
                self.order = self._permutation(self.cycle)
            rows.append(self.order[self.position])
            self.position += 1
        return rows


class TaskBatchSampler(Sampler[list[int]]):
    """Batches of global row indices (tasks laid end to end, task `i` starting at `offsets[i]`), one task per step.

    Each step draws a task (:func:`task_schedule`) and `per_device_batch_size * num_processes` rows of it, and yields
    them as `num_processes` consecutive batches: Accelerate's `BatchSamplerShard` hands batch `k` to process
    `k mod num_processes`, so every process trains on the same task at every step, and one process with the whole
    global batch sees exactly the rows two processes see together. With `strategy="all"` each batch holds
    `per_device_batch_size` rows of every task.

    Args:
        sizes (`Sequence[int]`): rows per task.
        per_device_batch_size (`int`): rows per task in one process's batch.
        num_processes (`int`): processes sharing a step.
        strategy (`str`), temperature (`float`), seed (`int`): see :func:`task_schedule`.
        steps_per_epoch (`int`, *optional*): defaults to `ceil(sum(sizes) / global batch)` (once through the data on
            average).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        per_device_batch_size: int,
        num_processes: int = 1,
        strategy: str = "proportional",
        temperature: float = 1.0,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        task_probabilities(sizes, strategy, temperature)  # checks sizes, strategy, temperature
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.per_device_batch_size = per_device_batch_size
        # the length of every yielded batch: Accelerate's BatchSamplerShard only yields batches of exactly this size
        self.batch_size = per_device_batch_size * (len(self.sizes) if strategy == "all" else 1)
        self.num_processes = num_processes
        self.strategy, self.temperature, self.seed = strategy, temperature, seed
        global_batch = per_device_batch_size * num_processes
        self.steps_per_epoch = steps_per_epoch or max(1, math.ceil(sum(self.sizes) / global_batch))
        self.drop_last = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.num_processes

    def schedule(self) -> list[int]:
        """The task index of each step of the current epoch (`-1`: every task)."""
        return task_schedule(
            self.sizes, self.strategy, self.steps_per_epoch, self.seed, self.epoch, temperature=self.temperature
        )

    def __iter__(self) -> Iterator[list[int]]:
        streams = [_RowStream(size, self.seed, self.epoch, task) for task, size in enumerate(self.sizes)]
        global_batch = self.per_device_batch_size * self.num_processes
        for task in self.schedule():
            tasks = range(len(self.sizes)) if task == -1 else [task]
            rows = {t: [self.offsets[t] + row for row in streams[t].take(global_batch)] for t in tasks}
            for process in range(self.num_processes):
                window = slice(process * self.per_device_batch_size, (process + 1) * self.per_device_batch_size)
                yield [index for t in tasks for index in rows[t][window]]
