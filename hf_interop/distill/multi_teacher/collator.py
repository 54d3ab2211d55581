"""Batches for `MultiTeacherDistillationTrainer`: each row's teacher as an index, and served teachers asked early.

The routing column (teacher names, strings) becomes `teacher_index`, a `(batch,)` tensor of positions in the
trainer's teacher list. Every served teacher is asked for the rows it teaches (all rows when teachers are mixed)
as soon as the batch is built, so the server answers while the student computes the previous step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..collators import IGNORE_INDEX
from ..served_teacher import online as served
from .cached import CACHE_ROW_PREFIX, cached_answers

TEACHER_INDEX_KEY = "teacher_index"
# batch key of a served (or cached) teacher's answers: f"{SERVED_ANSWERS_PREFIX}{name}" -> (rows, pending or resolved
# answers)
SERVED_ANSWERS_PREFIX = "served_teacher_answers/"


def check_routing_column(dataset: Any, column: str, names: Sequence[str], argument: str) -> None:
    """Before anything is loaded: the routing column exists and names only known teachers."""
    if dataset is None:
        return
    column_names = getattr(dataset, "column_names", None)
    if column_names is None:
        return  # an iterable of dicts without a schema: checked batch by batch by the collator
    if column not in column_names:
        raise ValueError(
            f"{argument} has no column {column!r} naming each example's teacher (columns: {column_names}); add it, "
            "set teacher_column to the column that holds the names, or use teacher_combination='mixture'."
        )
    values = dataset.unique(column) if hasattr(dataset, "unique") else {row[column] for row in dataset}
    unknown = sorted({str(value) for value in values} - set(names))
    if unknown:
        raise ValueError(
            f"{argument} routes examples to unknown teacher(s) {unknown} in column {column!r}; the teachers are "
            f"{list(names)}. Rename them in the data or add them to `teachers`."
        )


class MultiTeacherCollator:
    """Collates with `base` (which never sees the routing column), then adds `teacher_index` and asks served
    teachers for their rows."""

    def __init__(
        self,
        base: Callable,
        names: Sequence[str],
        routing_column: str | None,
        served_teachers: dict[str, Any],
        caches: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.names = list(names)
        self.index_of = {name: index for index, name in enumerate(self.names)}
        self.routing_column = routing_column
        self.served_teachers = served_teachers
        self.caches = caches or {}
        self.cache_tables = {name: cache.dataset.with_format("numpy") for name, cache in self.caches.items()}
        self.batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.batches += 1
        teacher_index = None
        if self.routing_column is not None:
            routed = []
            for row, feature in enumerate(features):
                name = feature.get(self.routing_column)
                if name not in self.index_of:
                    raise ValueError(
                        f"batch {self.batches}, row {row}: {self.routing_column}={name!r} is not one of the teachers "
                        f"{self.names}."
                    )
                routed.append(self.index_of[name])
            teacher_index = torch.tensor(routed, dtype=torch.long)
        kept = [
            {
                key: value
                for key, value in f.items()
                if key != self.routing_column and not key.startswith(CACHE_ROW_PREFIX)
            }
            for f in features
        ]
        batch = dict(self.base(kept))
        if teacher_index is not None:
            batch[TEACHER_INDEX_KEY] = teacher_index
        for name, cache in self.caches.items():
            answers = cached_answers(cache, self.cache_tables[name], name, features, batch)
            if answers is not None:
                batch[f"{SERVED_ANSWERS_PREFIX}{name}"] = answers
        for name, teacher in self.served_teachers.items():
            rows = torch.arange(batch["input_ids"].shape[0])
            if teacher_index is not None:
                rows = (teacher_index == self.index_of[name]).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if "labels" in batch:  # positions the server never reports are no target of that teacher's rows
                for position in teacher.known_missing_positions():
                    if position + 1 < batch["labels"].shape[1]:
                        batch["labels"][rows, position + 1] = IGNORE_INDEX
            sub = {"input_ids": batch["input_ids"][rows]}
            if batch.get("attention_mask") is not None:
                sub["attention_mask"] = batch["attention_mask"][rows]
            pending = served.ask(teacher, sub, where=f"batch {self.batches} (teacher {name!r})")
            if torch.utils.data.get_worker_info() is not None:  # futures cannot cross processes: wait here
                pending = pending.resolve()
            batch[f"{SERVED_ANSWERS_PREFIX}{name}"] = (rows, pending)
        return batch
