"""Data for cross-tokenizer distillation: raw text in, both tokenisations and the alignment index out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..text_alignment import ALIGNMENT_MODES, align_texts, build_span_alignment_index, check_offsets_support

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def _start_token_id(tokenizer: PreTrainedTokenizerBase, token: str | None, argument: str) -> int | None:
    if token is None:
        return None
    if token == "auto":
        token = tokenizer.bos_token or tokenizer.eos_token
        if token is None:
            return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{argument}={token!r} is not a token of {type(tokenizer).__name__}; pass one of its special tokens "
            f"(e.g. {tokenizer.eos_token!r}), 'auto' (BOS, else EOS) or None (no start token)."
        )
    return int(token_id)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class CrossTokenizerDistillationCollator:
    """Tokenise raw text with both tokenizers, align it, and build the tensors of one training batch.

    Each row's text is cut to `max_length` student tokens (the teacher sees the same characters). A start token
    is put before each side's tokens, so the first span has a position that predicts it.

    Args:
        student_tokenizer (`PreTrainedTokenizerBase`): the student's (fast) tokenizer.
        teacher_tokenizer (`PreTrainedTokenizerBase`): the teacher's (fast) tokenizer.
        max_length (`int`, *optional*, defaults to 256): student tokens per row, start token included.
        alignment (`str`, *optional*, defaults to `"spans"`): see :func:`align_texts`.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the raw text.
        student_start_token, teacher_start_token (`str`, *optional*, defaults to `"auto"`):
            Token put before the text on each side: `"auto"` is the tokenizer's BOS, else its EOS; `None` for none
            (then each text's first span is not distilled).

    Returns (on call):
        `dict` with `input_ids`, `attention_mask`, `labels` (student; -100 on padding and the start token),
        `teacher_input_ids`, `teacher_attention_mask`, and the `alignment_*` index tensors of
        :class:`SpanAlignmentIndex`.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase | None,
        *,
        max_length: int = 256,
        alignment: str = "spans",
        text_column: str = "text",
        student_start_token: str | None = "auto",
        teacher_start_token: str | None = "auto",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (a start token and one text token).")
        if alignment not in ALIGNMENT_MODES:
            raise ValueError(f"alignment={alignment!r} is not supported; use one of {ALIGNMENT_MODES}.")
        self.max_length = max_length
        self.alignment = alignment
        self.text_column = text_column
        self.student_start_token = student_start_token
        self.teacher_start_token = teacher_start_token
        self.student_tokenizer = student_tokenizer
        self.student_start_id = _start_token_id(student_tokenizer, student_start_token, "student_start_token")
        self.teacher_tokenizer = None
        if teacher_tokenizer is not None:
            self.set_teacher_tokenizer(teacher_tokenizer)
        if alignment == "spans":
            check_offsets_support(student_tokenizer, "student_tokenizer")

    def set_teacher_tokenizer(self, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
        if self.alignment == "spans":
            check_offsets_support(teacher_tokenizer, "teacher_tokenizer")
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_start_id = _start_token_id(teacher_tokenizer, self.teacher_start_token, "teacher_start_token")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if self.teacher_tokenizer is None:
            raise ValueError("the collator has no teacher tokenizer; pass teacher_tokenizer=... when building it.")
        if any(self.text_column not in feature for feature in features):
            raise ValueError(
                f"rows must hold the raw text in column {self.text_column!r} (got keys {sorted(features[0])}); "
                "cross-tokenizer distillation tokenises text itself, so pass the untokenised dataset."
            )
        texts = [feature[self.text_column] for feature in features]
        student_offset = int(self.student_start_id is not None)
        teacher_offset = int(self.teacher_start_id is not None)
        alignments = align_texts(
            texts,
            self.student_tokenizer,
            self.teacher_tokenizer,
            max_student_tokens=self.max_length - student_offset,
            alignment=self.alignment,
        )
        student_rows = [[self.student_start_id] * student_offset + a.student_ids for a in alignments]
        teacher_rows = [[self.teacher_start_id] * teacher_offset + a.teacher_ids for a in alignments]
        student_length = max(len(row) for row in student_rows)
        teacher_length = max(len(row) for row in teacher_rows)

        def pad(rows: list[list[int]], length: int, value: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.full((len(rows), length), value, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for row_index, row in enumerate(rows):
                ids[row_index, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[row_index, : len(row)] = 1
            return ids, mask

        input_ids, attention_mask = pad(student_rows, student_length, _pad_id(self.student_tokenizer))
        teacher_input_ids, teacher_attention_mask = pad(teacher_rows, teacher_length, _pad_id(self.teacher_tokenizer))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if student_offset:
            labels[:, 0] = -100
        index = build_span_alignment_index(
            alignments, student_length, teacher_length, student_offset=student_offset, teacher_offset=teacher_offset
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "teacher_input_ids": teacher_input_ids,
            "teacher_attention_mask": teacher_attention_mask,
            **index.to_batch(),
        }
