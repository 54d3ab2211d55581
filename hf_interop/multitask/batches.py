"""The rows of several task datasets as one indexable dataset, the collator that groups a batch by task, and the checks
run on the datasets before any training starts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
LABEL_COLUMNS = ("labels", "label")


class TaskRows(torch.utils.data.Dataset):
    """Task datasets laid end to end; row `i` comes back as the task's row plus its `task_id`."""

    def __init__(self, datasets: Mapping[str, Any], task_names: Sequence[str]) -> None:
        self.task_names = list(task_names)
        self.datasets = [datasets[name] for name in self.task_names if name in datasets]
        self.task_ids = [self.task_names.index(name) for name in self.task_names if name in datasets]
        self.sizes = [len(dataset) for dataset in self.datasets]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = max(i for i, offset in enumerate(self.offsets) if offset <= index)
        row = dict(self.datasets[position][index - self.offsets[position]])
        row["task_id"] = self.task_ids[position]
        return row


class MultiTaskCollator:
    """Rows of any tasks -> `{"task_batches": {task: {"input_ids", "attention_mask", "labels"}}}`, right-padded.

    Causal-LM rows: `labels` default to the inputs, `-100` on padding (the model shifts them). Classification rows:
    one class id per row (`labels` or `label` column); regression rows: one float per row.
    """

    def __init__(self, task_names: Sequence[str], task_types: Mapping[str, str], pad_token_id: int) -> None:
        self.task_names = list(task_names)
        self.task_types = dict(task_types)
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        grouped: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            grouped.setdefault(int(row["task_id"]), []).append(row)
        batches = {}
        for task_id in sorted(grouped):
            task = self.task_names[task_id]
            batches[task] = self._batch(grouped[task_id], self.task_types.get(task, "causal_lm"))
        return {"task_batches": batches}

    def _batch(self, rows: list[dict[str, Any]], task_type: str) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            mask = row.get("attention_mask")
            attention_mask[i, : len(ids)] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if task_type == "causal_lm":
            labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(rows):
                row_labels = row.get("labels", row["input_ids"])
                labels[i, : len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.long)
            batch["labels"] = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        else:
            values = [_row_label(row) for row in rows]
            dtype = torch.long if task_type == "classification" else torch.float32
            batch["labels"] = torch.tensor(values, dtype=dtype)
        return batch


def _row_label(row: Mapping[str, Any]) -> Any:
    for column in LABEL_COLUMNS:
        if column in row:
            return row[column]
    raise KeyError("labels")


def _label_column(dataset: Any) -> str | None:
    columns = getattr(dataset, "column_names", None) or []
    return next((column for column in LABEL_COLUMNS if column in columns), None)


def check_task_datasets(
    datasets: Any,
    argument: str,
    task_types: Mapping[str, str],
    num_labels: Mapping[str, int | None],
    vocab_size: int | None,
    known_tasks: Sequence[str] | None = None,
) -> None:
    """Refuse, naming the task and the fix, before training: a non-dict, an empty task, rows without `input_ids`,
    labels that do not fit the task's head, token ids outside the model's vocabulary (another tokenizer's ids)."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError(
            f"{argument} must be a non-empty dict of task name to dataset, e.g. {{'python_docs': blocks, "
            f"'domain': rows}}; got {type(datasets).__name__}."
        )
    for task, dataset in datasets.items():
        if known_tasks is not None and task not in known_tasks:
            raise ValueError(
                f"{argument} has task {task!r}, which train_dataset lacks ({list(known_tasks)}); evaluate the "
                "training tasks only."
            )
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError(f"{argument}[{task!r}] is empty; give the task at least one row or leave it out.")
        columns = getattr(dataset, "column_names", None)
        if columns is not None and "input_ids" not in columns:
            raise ValueError(
                f"{argument}[{task!r}] has columns {columns} but no 'input_ids'; tokenize it first (e.g. "
                "hf_interop.pack_dataset for text, tokenizer(...) for classification rows)."
            )
        task_type = task_types.get(task, "causal_lm")
        if columns is not None:
            _check_labels(dataset, task, task_type, num_labels.get(task), argument)
            if vocab_size is not None:
                largest = max((max(ids) for ids in dataset["input_ids"] if len(ids)), default=-1)
                if largest >= vocab_size or largest < -1:
                    raise ValueError(
                        f"{argument}[{task!r}] holds token id {largest}, outside the model's vocabulary of "
                        f"{vocab_size}: it was tokenized with another tokenizer; tokenize every task with the model's."
                    )


def _check_labels(dataset: Any, task: str, task_type: str, num_labels: int | None, argument: str) -> None:
    column = _label_column(dataset)
    if task_type == "causal_lm":
        if column is not None and len(dataset) and not isinstance(dataset[0][column], (list, tuple)):
            raise ValueError(
                f"{argument}[{task!r}] has one label per row (column {column!r}) but the task has no head, so it is "
                "trained as causal LM; give the model a head for it: MultiTaskModel(backbone, heads={"
                f"{task!r}: {{'type': 'classification', 'num_labels': N}}}})."
            )
        return
    if column is None:
        raise ValueError(f"{argument}[{task!r}] is a {task_type} task but has no 'labels' or 'label' column.")
    values = dataset[column]
    if task_type == "classification":
        bad = [v for v in values if isinstance(v, float) and not float(v).is_integer() or isinstance(v, (list, str))]
        if bad:
            raise ValueError(
                f"{argument}[{task!r}] has label {bad[0]!r}, not a class id, but the task has a classification head; "
                "give integer class ids, or declare the task {'type': 'regression'}."
            )
        out_of_range = [int(v) for v in values if not 0 <= int(v) < int(num_labels or 0)]
        if out_of_range:
            raise ValueError(
                f"{argument}[{task!r}] has label id {out_of_range[0]}, outside [0, {num_labels}) of its classification "
                "head; fix the labels or give the head more num_labels."
            )
    else:
        bad = [v for v in values if isinstance(v, (list, str)) or not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"{argument}[{task!r}] has regression target {bad[0]!r}; give one finite float per row.")
