"""Capturing a teacher cache from a served teacher: the checks before anything is written, and the rows.

`cache_teacher_logits` (teacher_cache/writer.py) calls these when its teacher is a URL or a `ServedTeacher`; the
rows it gets are the same `(ids, float16 logprobs rounded toward -inf)` pairs an in-process teacher gives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


def connect_served_teacher_for_capture(
    teacher: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    top_k: int,
    served_model: str | None,
    concurrency: int,
    teacher_name_or_path: str | None,
    teacher_revision: str | None,
) -> tuple[Any, str, str | None]:
    """The served teacher, checked against the server and `tokenizer` before anything is written."""
    from .client import ServedTeacher

    if tokenizer is None:
        raise ValueError(
            "a served teacher needs tokenizer=<the student's tokenizer> (CLI: --tokenizer), which maps the "
            "server's tokens to ids and is fingerprinted into the cache."
        )
    if not isinstance(teacher, ServedTeacher):
        teacher = ServedTeacher(str(teacher), model=served_model, top_k=top_k, concurrency=concurrency)
    elif teacher.top_k != top_k:
        raise ValueError(f"top_k={top_k} but the ServedTeacher asks for top_k={teacher.top_k}; make them equal.")
    if teacher.table is None or teacher.tokenizer is not tokenizer:  # not yet checked against this tokenizer
        teacher.connect(tokenizer)
    teacher_id = teacher_name_or_path or str(teacher.model)
    return teacher, teacher_id, teacher_revision or teacher.model_info.get("revision")


def served_rows(teacher: Any, reading: Dataset, start: int, end: int, progress: Any) -> Iterator[tuple[Any, Any]]:
    """Rows `start..end-1` answered by the server, many in flight, yielded in order as `(ids, logprobs)`."""
    ids_dtype = np.uint16 if teacher.vocab_size <= 65536 else np.int32
    started, tokens = time.perf_counter(), 0

    def requests() -> Iterator[tuple[str, list[int]]]:
        for row in range(start, end):
            yield f"dataset row {row}", list(reading[row]["input_ids"])

    for row_ids, row_logprobs in teacher.iter_topk(requests()):
        tokens += row_ids.shape[0] + 1
        progress.update(1)
        progress.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}", refresh=False)
        yield row_ids.astype(ids_dtype), row_logprobs
