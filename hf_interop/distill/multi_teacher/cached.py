"""Teachers read from their own teacher-logits caches (`hf-interop cache-teacher` / `cache_teacher_logits`).

A cache holds one teacher's top-k distributions for the rows of the tokenized dataset it was computed on. With
routing, a teacher's cache must hold exactly the rows routed to it, in order (its domain's training blocks); with a
mixture, every training row. Each training row gets the index of its row in each cache (`-1`: none), checked by
the cache's dataset fingerprint before training, and the collator reads those cache rows per batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..collators import IGNORE_INDEX
from ..teacher_cache.format import IDS_COLUMN, LOGPROBS_COLUMN, MANIFEST_FILE, PAD_LOGPROB, TAIL_COLUMN

CACHE_ROW_PREFIX = "teacher_cache_row:"


def is_cache_folder(source: Any) -> bool:
    """Whether `source` is the folder of a teacher-logits cache."""
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, MANIFEST_FILE))


def with_cache_rows(
    dataset: Any, name: str, cache: Any, routing_column: str | None, argument: str = "train_dataset"
) -> Any:
    """`dataset` with column `teacher_cache_row:<name>`: each row's index in `cache` (`-1` for rows of other teachers).

    Raises `ValueError` (naming the teacher and what differs) when the rows are not the ones the cache was made on.
    """
    if routing_column is not None:
        positions = [index for index, teacher in enumerate(dataset[routing_column]) if teacher == name]
    else:
        positions = list(range(len(dataset)))
    rows = dataset.select(positions) if routing_column is not None else dataset
    try:
        cache.check_compatible(dataset=rows)
    except ValueError as error:
        which = f"the rows of {argument} routed to {name!r}" if routing_column is not None else f"{argument}"
        raise ValueError(f"teacher {name!r} is a cache made on other rows than {which}: {error}") from error
    cache_rows = np.full(len(dataset), -1, dtype=np.int64)
    cache_rows[positions] = np.arange(len(positions))
    column = CACHE_ROW_PREFIX + name
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, cache_rows.tolist())


def cached_answers(
    cache: Any, table: Any, name: str, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], torch.Tensor]] | None:
    """The cache's distributions for the batch rows that have a cache row, shaped like a served teacher's answers
    `(rows, (columns (n, S-1, k), positions without a distribution (n, S-1)))`; their labels there become -100.
    `table` is `cache.dataset` in numpy format (made once by the caller, not per batch)."""
    column = CACHE_ROW_PREFIX + name
    picked = [(row, int(feature[column])) for row, feature in enumerate(features) if int(feature.get(column, -1)) >= 0]
    if not picked:
        return None
    columns = cache.collate([table[cache_row] for _, cache_row in picked])
    positions = batch["input_ids"].shape[1] - 1
    width = columns[IDS_COLUMN].shape[1]
    if width < positions:  # the batch is padded further than these rows: pad like the cache pads
        extra = positions - width
        columns = {
            IDS_COLUMN: torch.nn.functional.pad(columns[IDS_COLUMN], (0, 0, 0, extra)),
            LOGPROBS_COLUMN: torch.nn.functional.pad(columns[LOGPROBS_COLUMN], (0, 0, 0, extra), value=PAD_LOGPROB),
            TAIL_COLUMN: torch.nn.functional.pad(columns[TAIL_COLUMN], (0, extra)),
        }
    missing = (columns[LOGPROBS_COLUMN] <= PAD_LOGPROB / 2).all(-1)
    rows = torch.tensor([row for row, _ in picked], dtype=torch.long)
    if "labels" in batch:  # no teacher distribution: no target (the Trainer's count of valid tokens leaves it out)
        batch["labels"][rows, 1:] = batch["labels"][rows, 1:].masked_fill(missing, IGNORE_INDEX)
    return rows, (columns, missing)
