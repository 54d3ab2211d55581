"""The trainer's side of a served teacher: answers asked for while the student steps, then turned into loss inputs.

The collator sends a batch's rows to the server as soon as the batch is built and puts a :class:`PendingAnswers`
in it. Accelerate's data loader builds batch `n + 1` before it hands out batch `n`, and the Trainer gathers all
micro-batches of an optimizer step up front, so the teacher works on the next batch while the student computes
this one; the loss waits only for what is not there yet (the wait is logged as `teacher_wait_seconds`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from ..collators import IGNORE_INDEX, TEACHER_CACHE_COLUMNS
from ..teacher_cache.format import PAD_LOGPROB, tail_logprob_from_topk
from .client import ServedTeacher, ServedTeacherError
from .responses import ServedTeacherAnswerError

#: Key of the pending answers in a batch (popped by the trainer before the student's forward).
ANSWERS_KEY = "served_teacher_answers"


class PendingAnswers:
    """The served teacher's answers for the rows of one batch, in flight or done."""

    def __init__(
        self, futures: list[Future], spans: list[tuple[int, int]], width: int, top_k: int, where: str
    ) -> None:
        self.futures = futures
        self.spans = spans
        self.width = width
        self.top_k = top_k
        self.where = where
        self.wait_seconds = 0.0

    def to(self, *args: Any, **kwargs: Any) -> PendingAnswers:  # moved with the batch by Accelerate: stays on host
        return self

    def resolve(self, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`(columns, missing)`: the cache-shaped teacher columns `(B, width-1, k)` and a `(B, width-1)` mask of
        positions without a teacher distribution (padding excluded)."""
        started = time.perf_counter()
        try:
            answers = [future.result() for future in self.futures]
        except (ServedTeacherError, ServedTeacherAnswerError) as error:
            raise ValueError(f"the served teacher failed on {self.where}: {error}") from error
        self.wait_seconds = time.perf_counter() - started
        return answers_to_columns(answers, self.spans, self.width, self.top_k, device)


def answers_to_columns(
    answers: list[tuple[np.ndarray, np.ndarray]],
    spans: list[tuple[int, int]],
    width: int,
    top_k: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Teacher columns shaped as `TeacherLogitsCache.collate` gives them (row `r`'s answer at the positions of its
    tokens `spans[r] = (start, end)`, padding elsewhere) and the mask of positions the server gave no distribution."""
    positions = max(width - 1, 0)
    ids = np.zeros((len(answers), positions, top_k), dtype=np.int64)
    logprobs = np.full((len(answers), positions, top_k), PAD_LOGPROB, dtype=np.float32)
    padding = np.ones((len(answers), positions), dtype=bool)
    for row, ((row_ids, row_logprobs), (start, end)) in enumerate(zip(answers, spans, strict=True)):
        ids[row, start : end - 1] = row_ids
        logprobs[row, start : end - 1] = row_logprobs.astype(np.float32)
        padding[row, start : end - 1] = False
    logprob_tensor = torch.from_numpy(logprobs)
    missing = (logprob_tensor <= PAD_LOGPROB / 2).all(-1) & ~torch.from_numpy(padding)
    tail = tail_logprob_from_topk(logprob_tensor)
    columns = dict(zip(TEACHER_CACHE_COLUMNS, (torch.from_numpy(ids), logprob_tensor, tail), strict=True))
    return {name: value.to(device) for name, value in columns.items()}, missing.to(device)


def _row_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Per row, `(start, end)` of its tokens (padding on either side, none inside)."""
    mask = batch.get("attention_mask")
    rows, width = batch["input_ids"].shape
    if mask is None:
        return [(0, width)] * rows
    spans = []
    for row in range(rows):
        kept = mask[row].nonzero().flatten()
        if len(kept) == 0:
            spans.append((0, 0))
            continue
        start, end = int(kept[0]), int(kept[-1]) + 1
        if end - start != len(kept):
            raise ValueError(f"a served teacher needs rows without padding inside them; row {row} has some.")
        spans.append((start, end))
    return spans


def ask(teacher: ServedTeacher, batch: dict[str, torch.Tensor], where: str) -> PendingAnswers:
    """Send every row of `batch` to the server now; the answers arrive in the background."""
    spans = _row_spans(batch)
    input_ids = batch["input_ids"]
    futures = []
    for row, (start, end) in enumerate(spans):
        if end - start < 2:
            raise ValueError(f"{where}, row {row}: {end - start} token(s); a served teacher needs at least 2 per row.")
        futures.append(teacher.submit(input_ids[row, start:end].tolist(), where=f"{where}, row {row}"))
    return PendingAnswers(futures, spans, input_ids.shape[1], teacher.top_k, where)


class ServedTeacherCollator:
    """Collates with `base`, then asks the served teacher for the batch's rows (answered while the student steps).

    `known_missing` positions (the first one, for servers that never report it) get label -100 here, so the
    Trainer's count of valid targets already leaves them out. In a data-loader worker process the answers are
    awaited there (the worker is the prefetch), since futures cannot cross processes.
    """

    def __init__(self, base: Callable, teacher: ServedTeacher) -> None:
        self.base = base
        self.teacher = teacher
        self.batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self.base(features))
        self.batches += 1
        if "teacher_input_ids" in batch:  # cross-tokenizer batches: the teacher reads its own tokenisation
            rows = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch.get("teacher_attention_mask")}
        else:
            rows = batch
            if "labels" in batch:
                for position in self.teacher.known_missing_positions():
                    if position + 1 < batch["labels"].shape[1]:
                        batch["labels"][:, position + 1] = IGNORE_INDEX
        pending = ask(self.teacher, {k: v for k, v in rows.items() if v is not None}, where=f"batch {self.batches}")
        if torch.utils.data.get_worker_info() is not None:
            columns, missing = pending.resolve()
            batch.update(columns)
            batch[f"{ANSWERS_KEY}_missing"] = missing
        else:
            batch[ANSWERS_KEY] = pending
        return batch


def take_answers(
    teacher: ServedTeacher, inputs: dict[str, Any], cached: dict[str, torch.Tensor], when: str = ""
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Take the teacher's answers out of a batch (waiting for what has not arrived): `(columns, positions without
    an answer)`, or `({}, None)` for a batch without any (evaluation rows). The wait is added to the teacher's
    `statistics["wait_seconds"]`."""
    pending = inputs.pop(ANSWERS_KEY, None)
    missing = inputs.pop(f"{ANSWERS_KEY}_missing", None)
    device = inputs["input_ids"].device
    if pending is not None:
        try:
            cached, missing = pending.resolve(device)
        except ValueError as error:  # stop training rather than learn from a broken answer
            raise ValueError(f"{when}: {error}" if when else str(error)) from error
        teacher.statistics["wait_seconds"] = teacher.statistics.get("wait_seconds", 0.0) + pending.wait_seconds
    if not cached:
        return {}, None
    return cached, missing.to(device) if missing is not None else None


@torch.no_grad()
def served_continuations(
    generator: ServedTeacher,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation_config: Any,
    seed: int | None,
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `labels` of each left-padded prompt continued by a served model.

    The server returns text; it is tokenised with the student's tokenizer (sequence-level KD trains on the text) and
    cut at `max_new_tokens`. Prompts are masked out of the labels, and so is the right padding after a short answer.
    """
    prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask, strict=True)]
    texts = generator.generate(
        prompts,
        max_new_tokens=generation_config.max_new_tokens,
        temperature=generation_config.temperature,
        top_p=generation_config.top_p,
        top_k=generation_config.top_k,
        seed=seed,
    )
    limit = generation_config.max_new_tokens
    new_tokens = [tokenizer(text, add_special_tokens=False)["input_ids"][:limit] for text in texts]
    width = max(max((len(tokens) for tokens in new_tokens), default=0), 1)
    rows, prompt_width = len(prompts), prompt_ids.shape[1]
    sequences = torch.full((rows, prompt_width + width), generation_config.pad_token_id, dtype=prompt_ids.dtype)
    sequences[:, :prompt_width] = prompt_ids
    attention_mask = torch.zeros_like(sequences)
    attention_mask[:, :prompt_width] = prompt_mask
    labels = torch.full_like(sequences, IGNORE_INDEX)
    for row, tokens in enumerate(new_tokens):
        if tokens:
            end = prompt_width + len(tokens)
            sequences[row, prompt_width:end] = torch.tensor(tokens, dtype=prompt_ids.dtype)
            attention_mask[row, prompt_width:end] = 1
            labels[row, prompt_width:end] = sequences[row, prompt_width:end]
    return {"input_ids": sequences, "attention_mask": attention_mask, "labels": labels}


def connect_served_teacher(args: Any, teacher_model: Any, processing_class: Any, student_vocab_size: int) -> Any:
    """The trainer's served teacher from its config (or a `ServedTeacher` / URL passed as `teacher_model`), checked
    against the server and the student's tokenizer before training: `(teacher, shared_vocab_size or None)`."""
    if processing_class is None:
        raise ValueError(
            "a served teacher (teacher_url) needs the student's tokenizer: pass processing_class=tokenizer, which "
            "maps the server's tokens to ids and is checked against the server's before training."
        )
    if isinstance(teacher_model, ServedTeacher) and teacher_model.cross_tokenizer:
        return teacher_model, None  # checked against the teacher's own tokenizer by the cross-tokenizer trainer
    teacher = _served_teacher_from_config(args, teacher_model)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if teacher.table is None or teacher.tokenizer is not tokenizer:
        teacher.connect(tokenizer)
    if student_vocab_size < teacher.vocab_size:
        raise ValueError(
            f"the student's output head has {student_vocab_size} rows but its tokenizer has {teacher.vocab_size} "
            "tokens; resize its embeddings (model.resize_token_embeddings(len(tokenizer)))."
        )
    return teacher, (teacher.vocab_size if student_vocab_size != teacher.vocab_size else None)


def connect_generation_server(url: str, args: Any, processing_class: Any) -> ServedTeacher:
    """A served model used only to generate text (a served student for on-policy steps); checked at start."""
    server = _served_teacher_from_config(args, url, generation_only=True)
    server.connect(getattr(processing_class, "tokenizer", processing_class))
    return server


def _served_teacher_from_config(args: Any, teacher_model: Any, generation_only: bool = False) -> ServedTeacher:
    """`teacher_model` when it is a `ServedTeacher`, else one for its URL (`args.teacher_url` first, unless the
    server only generates) with the config's request settings."""
    if isinstance(teacher_model, ServedTeacher):
        return teacher_model
    return ServedTeacher(
        teacher_model if generation_only else (args.teacher_url or teacher_model),
        model=None if generation_only else args.teacher_served_model,
        top_k=1 if generation_only else args.teacher_top_k,
        concurrency=args.teacher_concurrency,
        timeout=args.teacher_request_timeout,
        max_retries=args.teacher_max_retries,
        api_key_env=args.teacher_api_key_env,
    )


def dense_teacher_log_probs(columns: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """A served teacher's top-k answers as full `(B, T, vocab_size)` log-probabilities for the cross-tokenizer loss.

    Each position keeps its top-k log-probabilities; the rest of its mass (the tail) is spread evenly over the other
    `vocab_size - k` tokens, the maximum-entropy reading of what the server did not send (exact when `k` is the
    whole vocabulary). The row gets one more position at the end (its last token predicts nothing that was asked).
    """
    ids, logprobs, tail = (columns[name] for name in TEACHER_CACHE_COLUMNS)
    rows, positions, top_k = ids.shape
    spread = tail.float() - math.log(max(vocab_size - top_k, 1))
    dense = spread.unsqueeze(-1).expand(rows, positions, vocab_size).clone()
    dense.scatter_(-1, ids, logprobs.float())
    last = torch.full((rows, 1, vocab_size), -math.log(vocab_size), dtype=dense.dtype, device=dense.device)
    return torch.cat([dense, last], dim=1)


def drop_unanswered_spans(index: Any, missing: torch.Tensor) -> Any:
    """`index` (a `SpanAlignmentIndex` over teacher rows of width `missing.shape[1] + 1`) without the spans that
    read a teacher position the server gave no distribution for; the remaining spans keep their order."""
    if missing is None or not bool(missing.any()):
        return index
    rows, positions = missing.shape
    flat = torch.nonzero(missing.reshape(-1)).flatten()
    missing_rows = (flat // positions) * (positions + 1) + flat % positions
    matched_keep = ~torch.isin(index.matched_teacher_rows, missing_rows)
    bad = torch.isin(index.unmatched_teacher_rows, missing_rows)
    bad_continuations = torch.isin(index.teacher_continuation_rows, missing_rows)
    bad[index.teacher_continuation_spans[bad_continuations]] = True
    keep = ~bad
    renumber = torch.cumsum(keep.long(), 0) - 1
    student_keep = keep[index.student_continuation_spans]
    teacher_keep = keep[index.teacher_continuation_spans]
    return type(index)(
        matched_student_rows=index.matched_student_rows[matched_keep],
        matched_teacher_rows=index.matched_teacher_rows[matched_keep],
        unmatched_student_rows=index.unmatched_student_rows[keep],
        unmatched_teacher_rows=index.unmatched_teacher_rows[keep],
        student_continuation_rows=index.student_continuation_rows[student_keep],
        student_continuation_tokens=index.student_continuation_tokens[student_keep],
        student_continuation_spans=renumber[index.student_continuation_spans[student_keep]],
        teacher_continuation_rows=index.teacher_continuation_rows[teacher_keep],
        teacher_continuation_tokens=index.teacher_continuation_tokens[teacher_keep],
        teacher_continuation_spans=renumber[index.teacher_continuation_spans[teacher_keep]],
    )


def connect_cross_tokenizer_teacher(args: Any, teacher_model: Any, teacher_tokenizer: Any) -> ServedTeacher:
    """A served teacher for cross-tokenizer distillation, checked against the *teacher's* tokenizer (the student's
    differs by design); the span alignment then uses that tokenizer's byte offsets."""
    if teacher_tokenizer is None:
        raise ValueError(
            "a served teacher across tokenizers needs teacher_processing_class=<the served model's tokenizer>, "
            "whose byte offsets align its tokens with the student's."
        )
    teacher = _served_teacher_from_config(args, teacher_model)
    if teacher.table is None or teacher.tokenizer is not teacher_tokenizer:
        teacher.connect(teacher_tokenizer)
    teacher.cross_tokenizer = True
    return teacher
