"""Teachers whose tokenizers differ from the student's (`MultiTeacherDistillationConfig.cross_tokenizer=True`).

Raw text comes in; the student's tokens and, per teacher, that teacher's tokens and the span alignment between the
two (the index of :class:`~hf_interop.text_alignment.SpanAlignmentIndex`) go out. Each teacher is compared with the
student by the span-aligned hybrid loss of cross-tokenizer distillation, and the teachers are combined at the loss:

    loss = kd_ratio * sum_k sum_b w_bk * D_k(b) / N  +  (1 - kd_ratio) * CE / N

with `D_k(b)` the sum over teacher `k`'s aligned spans of example `b`, `w_bk` the example's weight of teacher `k`
(one-hot when routed) and `N` the valid student target tokens of the whole batch. For forward KL, `sum_k w_k
KL(q_k || p) = KL(sum_k w_k q_k || p) + const`, so wherever the teachers' spans coincide this has the gradient of
KL(mixture || student).
"""

from __future__ import annotations

from typing import Any

import torch

from ...losses.cross_tokenizer import span_aligned_distillation_loss
from ...text_alignment import SpanAlignmentIndex, VocabularyMapping
from ..cross_tokenizer_collator import CrossTokenizerDistillationCollator
from .combination import teacher_weights_per_example

TEACHER_BATCH_PREFIX = "teacher_batch/"


class MultiTokenizerCollator:
    """Tokenises each row's raw text for the student and for every teacher, with one span alignment per teacher."""

    def __init__(self, student_tokenizer: Any, args: Any) -> None:
        self.student_tokenizer = student_tokenizer
        self.args = args
        self.collators: dict[str, CrossTokenizerDistillationCollator] = {}

    def add_teacher(self, name: str, teacher_tokenizer: Any) -> None:
        args = self.args
        self.collators[name] = CrossTokenizerDistillationCollator(
            self.student_tokenizer,
            teacher_tokenizer,
            max_length=args.max_length,
            alignment=args.alignment,
            text_column=args.text_column,
            student_start_token=args.student_start_token or None,
            teacher_start_token=args.teacher_start_token or None,
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for name, collator in self.collators.items():
            part = collator(features)
            if not batch:
                batch = {key: part[key] for key in ("input_ids", "attention_mask", "labels")}
            prefix = f"{TEACHER_BATCH_PREFIX}{name}/"
            for key, value in part.items():
                if key.startswith("teacher_") or key.startswith("alignment_"):
                    batch[prefix + key] = value
        return batch


def pop_teacher_batch(inputs: dict[str, Any], name: str) -> tuple[dict[str, torch.Tensor], SpanAlignmentIndex]:
    """Teacher `name`'s inputs and alignment index, taken out of the batch."""
    prefix = f"{TEACHER_BATCH_PREFIX}{name}/"
    teacher_inputs = {
        "input_ids": inputs.pop(prefix + "teacher_input_ids"),
        "attention_mask": inputs.pop(prefix + "teacher_attention_mask"),
    }
    return teacher_inputs, SpanAlignmentIndex.from_batch(inputs, prefix=prefix + "alignment_", pop=True)


def text_log_likelihood(
    teacher_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """`(B,)` float64: the log-probability a teacher gives to each row's tokens after the first (its text)."""
    log_probs = torch.log_softmax(teacher_logits[:, :-1].double(), dim=-1)
    targets = input_ids[:, 1:].to(log_probs.device)
    token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    return (token_log_probs * attention_mask[:, 1:].to(token_log_probs)).sum(-1)


def matched_top1(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    index: SpanAlignmentIndex,
    mapping: VocabularyMapping | None,
    rows: torch.Tensor,
) -> tuple[int, int]:
    """`(agreeing, compared)`: matched spans of `rows` where the student's top token is the teacher's top token."""
    if mapping is None or index.num_matched == 0:
        return 0, 0
    student_length = student_logits.shape[1]
    in_rows = torch.isin(index.matched_student_rows // student_length, rows.to(index.matched_student_rows.device))
    if not bool(in_rows.any()):
        return 0, 0
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    lookup = torch.full((teacher_flat.shape[-1],), -1, dtype=torch.long, device=teacher_flat.device)
    lookup[mapping.teacher_ids.to(lookup.device)] = mapping.student_ids.to(lookup.device)
    student_top = student_flat[index.matched_student_rows[in_rows]].argmax(-1)
    teacher_top = lookup[teacher_flat[index.matched_teacher_rows[in_rows].to(teacher_flat.device)].argmax(-1)]
    return int((student_top == teacher_top.to(student_top.device)).sum()), int(in_rows.sum())


def cross_tokenizer_loss(
    trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any
) -> tuple[torch.Tensor, Any]:
    """The loss of one batch (see the module docstring) and the student's outputs; records the metrics."""
    args = trainer.args
    mode = "train" if model.training else "eval"
    inputs = dict(inputs)
    parts = {name: pop_teacher_batch(inputs, name) for name in trainer.teacher_names}
    labels = inputs.pop("labels")
    shift_labels = labels[:, 1:]
    num_valid_tokens = int((shift_labels != -100).sum())
    if num_items_in_batch is None:
        steps = trainer.current_gradient_accumulation_steps if model.training else 1
        num_items_in_batch = max(num_valid_tokens, 1) * steps
    outputs = model(**inputs, use_cache=False)
    student_logits = outputs.logits
    device = student_logits.device
    batch_size = labels.shape[0]
    routing = trainer._batch_routing.to(device) if trainer.routing else None

    teacher_logits, teacher_rows = {}, {}
    for position, name in enumerate(trainer.teacher_names):
        rows = (
            torch.arange(batch_size, device=device) if routing is None else (routing == position).nonzero().flatten()
        )
        if rows.numel() == 0:
            continue
        teacher_inputs, _ = parts[name]
        teacher_logits[name] = _teacher_logits_on_rows(trainer, name, teacher_inputs, rows).to(device)
        teacher_rows[name] = rows

    if routing is not None:
        weights = teacher_weights_per_example(batch_size, trainer.static_weights, teacher_index=routing, device=device)
    else:
        scores = None
        if args.teacher_weighting == "confidence":  # nats per student target token: one scale for every tokenizer
            counts = (shift_labels != -100).sum(-1).clamp(min=1).to(device, torch.float64)
            scores = torch.stack(
                [
                    text_log_likelihood(
                        teacher_logits[name], *(parts[name][0][key] for key in ("input_ids", "attention_mask"))
                    ).to(device)
                    / counts
                    for name in trainer.teacher_names
                ],
                dim=-1,
            )
        weights = teacher_weights_per_example(
            batch_size,
            trainer.static_weights,
            confidence_scores=scores,
            confidence_temperature=args.confidence_temperature,
            device=device,
        )
        trainer._weight_sums(model, weights, shift_labels)

    span_kwargs = {**args.span_loss_kwargs(), "num_items_in_batch": num_items_in_batch}
    kd_loss = student_logits.sum() * 0.0
    row_tokens = (shift_labels != -100).sum(-1)
    for position, name in enumerate(trainer.teacher_names):
        if name not in teacher_logits:
            continue
        _, index = parts[name]
        mapping = trainer._mappings.get(name)
        spans = span_aligned_distillation_loss(
            student_logits, teacher_logits[name], index, mapping, example_weights=weights[:, position], **span_kwargs
        )
        kd_loss = kd_loss + spans.loss
        alone = spans.loss.detach()
        if routing is None and args.per_teacher_metrics:
            with torch.no_grad():
                alone = span_aligned_distillation_loss(
                    student_logits.detach(), teacher_logits[name], index, mapping, **span_kwargs
                ).loss
        rows = teacher_rows[name]
        tokens = int(row_tokens[rows].sum())
        agreeing, compared = matched_top1(student_logits.detach(), teacher_logits[name], index, mapping, rows)
        statistics = {"kd_loss": alone, "top1_agreement": agreeing / compared if compared else None}
        length = student_logits.shape[1]
        matched = int(torch.isin(index.matched_student_rows.to(device) // length, rows).sum())
        unmatched = int(torch.isin(index.unmatched_student_rows.to(device) // length, rows).sum())
        spans_of_rows = (matched, matched + unmatched)  # this teacher's rows only (routing leaves others out)
        trainer._record(model, name, statistics, tokens, num_items_in_batch, spans_of_rows)

    normalizer = num_items_in_batch.to(device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    ce_sum = torch.nn.functional.cross_entropy(
        student_logits[:, :-1].reshape(-1, student_logits.shape[-1]).float(),
        shift_labels.reshape(-1).to(device),
        ignore_index=-100,
        reduction="sum",
    )
    ce_loss = ce_sum / normalizer
    loss = args.kd_ratio * kd_loss + (1.0 - args.kd_ratio) * ce_loss
    sums = trainer._metric_sums[mode]
    scale = float(num_items_in_batch)
    sums["num_tokens"] = sums.get("num_tokens", 0.0) + num_valid_tokens
    sums["kd_loss"] = sums.get("kd_loss", 0.0) + float(kd_loss.detach()) * scale
    sums["ce_loss"] = sums.get("ce_loss", 0.0) + float(ce_loss.detach()) * scale
    if model.training and args.average_tokens_across_devices and trainer.accelerator.num_processes > 1:
        loss = loss * trainer.accelerator.num_processes  # same convention as DistillationTrainer.compute_loss
    return loss, outputs


def _teacher_logits_on_rows(trainer: Any, name: str, teacher_inputs: dict[str, Any], rows: torch.Tensor) -> Any:
    """Teacher `name`'s logits over its whole tokenised batch, computed only on `rows` (cut to their longest
    attended length; zeros elsewhere, which weight 0 leaves out of the loss)."""
    input_ids, attention_mask = teacher_inputs["input_ids"], teacher_inputs["attention_mask"]
    batch_size, length = input_ids.shape
    rows = rows.to(input_ids.device)
    width = length
    if rows.numel() < batch_size:
        width = max(int(attention_mask[rows].sum(-1).max()), 2)  # rows are right-padded by the collator
    sub = {"input_ids": input_ids[rows, :width], "attention_mask": attention_mask[rows, :width]}
    teacher = trainer._teacher(name)
    with trainer._as_the_teacher(name, teacher):
        logits = trainer._teacher_forward(None, sub, want_hidden=False, want_logits=True).logits
    if rows.numel() == batch_size and width == length:
        return logits
    full = logits.new_zeros(batch_size, length, logits.shape[-1])
    full[rows.to(full.device), :width] = logits
    return full
