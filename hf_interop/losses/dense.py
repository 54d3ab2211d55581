"""The dense distillation loss over full logits of both models (the reference form), and what every form returns.

Every loss of `hf_interop.losses` takes logits (or hidden states) that are ALREADY ALIGNED with `labels`: position `i` predicts
`labels[..., i]`, the caller does the causal shift. Tokens whose label is `ignore_index` (-100) are left out
everywhere: they never reach the divergence, the statistics or the normaliser. Teacher inputs never get
gradients. Computation runs in float32 (bfloat16/float16 inputs are upcast), or in float64 when the student
input is float64 (used by the reference tests).

Three forms share the same math:

- [`distillation_loss`]: dense, over full `(..., vocab)` logits of both models; the reference.
- [`chunked_distillation_loss`]: from final hidden states plus each model's output head; valid tokens are
  processed `chunk_size` at a time, so neither model's full `(batch, seq, vocab)` logits tensor ever exists.
- [`sparse_distillation_loss`] / [`chunked_sparse_distillation_loss`]: from a cached top-k teacher distribution
  plus its leftover tail mass (see `hf_interop.teacher_cache`), either as k+1 buckets or, with a tail prior, with
  the tail spread over the vocabulary like the prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hf_interop.logging_utils import get_logger

from ..multitask.weighting import static_weighted_sum
from .divergences import (
    _check_cross_entropy_needed,
    _check_labels_in_vocab,
    _check_loss_arguments,
    _compute_dtype,
    _normalizer,
    _resolve_vocab,
    _select_valid,
    _token_divergence,
)

if TYPE_CHECKING:
    from torch import Tensor

logger = get_logger(__name__)

_ALL_IGNORED_WARNING = (
    "every label in this batch equals ignore_index, so the distillation loss is 0.0 for it; check the labels "
    "(e.g. a prompt mask that covers whole sequences) if this happens often."
)

# --------------------------------------------------------------------------------------------------------------
# outputs and statistics


@dataclass
class DistillationLossOutput:
    """What every distillation loss returns.

    Attributes:
        loss (`torch.Tensor`):
            `kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss` (0-d); what the trainer backpropagates.
        kd_loss (`torch.Tensor`):
            Sum of the per-token divergence over valid tokens divided by the normaliser. In the chunked forms it is
            detached (only `loss` carries gradients there).
        ce_loss (`torch.Tensor` or `None`):
            Cross-entropy of the student on `labels` with the same normaliser; `None` when not computed. Detached in
            the chunked forms.
        num_valid_tokens (`int`):
            Number of tokens whose label is not `ignore_index` (local to this call).
        top1_agreement (`float`):
            Fraction of valid tokens where the student's and the teacher's argmax agree.
        teacher_entropy (`float`):
            Mean entropy (nats, temperature 1) of the teacher over valid tokens. For the sparse forms: the entropy
            of the k+1 bucket distribution at the cache temperature (a lower bound of the full entropy).
        student_entropy (`float`):
            Mean entropy (nats, temperature 1) of the student over valid tokens.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor | None
    num_valid_tokens: int
    top1_agreement: float
    teacher_entropy: float
    student_entropy: float


def _entropy_from_logits(logits: Tensor) -> Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


class _Statistics:
    """Detached running sums of the logged statistics (one host sync at the end)."""

    def __init__(self) -> None:
        self.top1_matches: Tensor | float = 0.0
        self.teacher_entropy: Tensor | float = 0.0
        self.student_entropy: Tensor | float = 0.0

    @torch.no_grad()
    def add(self, student_logits: Tensor, teacher_argmax: Tensor, teacher_entropy: Tensor) -> None:
        student = student_logits.detach().to(_compute_dtype(student_logits))
        self.top1_matches = self.top1_matches + (student.argmax(-1) == teacher_argmax).sum()
        self.teacher_entropy = self.teacher_entropy + teacher_entropy.sum()
        self.student_entropy = self.student_entropy + _entropy_from_logits(student).sum()

    @torch.no_grad()
    def add_precomputed(
        self, student_argmax: Tensor, teacher_argmax: Tensor, teacher_entropy: Tensor, student_entropy: Tensor
    ) -> None:
        self.top1_matches = self.top1_matches + (student_argmax == teacher_argmax).sum()
        self.teacher_entropy = self.teacher_entropy + teacher_entropy.sum()
        self.student_entropy = self.student_entropy + student_entropy.sum()

    def means(self, count: int) -> tuple[float, float, float]:
        if count == 0:
            return 0.0, 0.0, 0.0
        return (
            float(self.top1_matches) / count,
            float(self.teacher_entropy) / count,
            float(self.student_entropy) / count,
        )


def _zero_loss(connected_to: Tensor) -> Tensor:
    # a 0-d zero that is part of the graph (backward works, gradients are exactly 0, never NaN)
    return connected_to.reshape(-1)[:0].sum().to(_compute_dtype(connected_to))


def _finish(
    kd_sum: Tensor,
    ce_sum: Tensor | None,
    total_sum: Tensor,
    normalizer: int | Tensor,
    num_valid_tokens: int,
    statistics: _Statistics,
) -> DistillationLossOutput:
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=total_sum.device, dtype=total_sum.dtype)
    elif normalizer == 0:
        normalizer = 1  # sums are 0 here: no valid token
    top1, teacher_entropy, student_entropy = statistics.means(num_valid_tokens)
    return DistillationLossOutput(
        loss=total_sum / normalizer,
        kd_loss=kd_sum / normalizer,
        ce_loss=None if ce_sum is None else ce_sum / normalizer,
        num_valid_tokens=num_valid_tokens,
        top1_agreement=top1,
        teacher_entropy=teacher_entropy,
        student_entropy=student_entropy,
    )


def _all_ignored_output(
    student_logits: Tensor, normalizer: int | Tensor, compute_ce_loss: bool
) -> DistillationLossOutput:
    logger.warning_once(_ALL_IGNORED_WARNING)
    zero = _zero_loss(student_logits)
    return _finish(zero, zero if compute_ce_loss else None, zero, normalizer, 0, _Statistics())


def _with_cross_entropy(
    kd_sum: Tensor, student_logits: Tensor, valid_labels: Tensor, kd_ratio: float, compute_ce_loss: bool
) -> tuple[Tensor | None, Tensor]:
    """The student's summed cross-entropy on `valid_labels` (`None` when not computed) and the total it mixes into."""
    ce_sum = None
    if compute_ce_loss:
        ce_sum = F.cross_entropy(student_logits.to(_compute_dtype(student_logits)), valid_labels, reduction="sum")
    # the same static weighting as multi-task training: KD and CE are two tasks weighted kd_ratio and 1 - kd_ratio
    total_sum = static_weighted_sum([kd_sum, ce_sum], [kd_ratio, 1.0 - kd_ratio])
    return ce_sum, total_sum


def _check_finite_teacher(teacher_logits: Tensor, argument: str = "teacher_logits") -> None:
    finite = torch.isfinite(teacher_logits)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{argument} hold {bad} non-finite values (NaN or inf) on valid tokens; the teacher's forward pass "
            "overflowed or its weights are broken (try teacher_dtype='float32' or 'bfloat16' instead of 'float16')."
        )


# --------------------------------------------------------------------------------------------------------------
# dense form


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    shared_vocab_size: int | None = None,
    compute_ce_loss: bool = True,
) -> DistillationLossOutput:
    """Distillation loss over full logits of student and teacher (the dense reference form).

    Args:
        student_logits (`torch.Tensor` of shape `(batch, seq, vocab_s)` or `(tokens, vocab_s)`):
            Student logits aligned with `labels`.
        teacher_logits (`torch.Tensor` of shape `(batch, seq, vocab_t)` or `(tokens, vocab_t)`):
            Teacher logits aligned with `labels`; never receive gradients.
        labels (`torch.LongTensor` of shape `(batch, seq)` or `(tokens,)`):
            Target ids; positions equal to `ignore_index` are excluded.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            One of `LOSS_TYPES`.
        temperature (`float`, *optional*, defaults to `1.0`):
            KD temperature, applied to both models (not to the cross-entropy term).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Teacher weight in the JSD mixture (`0` = forward KL, `1` = reverse KL, exactly).
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Skew of `skew_kl` / `skew_reverse_kl`.
        scale_by_temperature_squared (`bool`, *optional*):
            Multiply the divergence by `temperature ** 2`; defaults to `True` for `forward_kl` only.
        kd_ratio (`float`, *optional*, defaults to `1.0`):
            Weight of the KD term; `1 - kd_ratio` weighs the cross-entropy on `labels`.
        ignore_index (`int`, *optional*, defaults to `-100`):
            Label value of positions to skip.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Normaliser: the number of valid tokens in the whole global batch (across gradient-accumulation steps
            and processes), so the result does not depend on how the batch is split. Defaults to the local number
            of valid tokens.
        shared_vocab_size (`int`, *optional*):
            Compare only the first `shared_vocab_size` columns (same tokenizer, padded embedding matrices). Required
            when the two vocab sizes differ.
        compute_ce_loss (`bool`, *optional*, defaults to `True`):
            Compute the student's cross-entropy (over its full vocabulary). Needed when `kd_ratio < 1`.

    Returns:
        [`DistillationLossOutput`]. When every label is `ignore_index`, the losses are a differentiable 0.0 and a
        warning is logged.

    Raises:
        `ValueError`: bad arguments or shapes, or non-finite teacher logits on valid tokens.
    """
    _check_loss_arguments(loss_type, temperature, jsd_beta, skew_alpha, kd_ratio)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} and teacher_logits shape "
            f"{tuple(teacher_logits.shape)} differ before the vocab dim; both must be aligned with labels."
        )
    _check_cross_entropy_needed(kd_ratio, compute_ce_loss)
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    vocab = _resolve_vocab(student_vocab, teacher_vocab, shared_vocab_size)
    valid, valid_labels = _select_valid(labels, student_logits.shape[:-1], "student_logits", ignore_index)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    statistics = _Statistics()

    if num_valid == 0:
        return _all_ignored_output(student_logits, normalizer, compute_ce_loss)

    student = student_logits.reshape(-1, student_vocab).index_select(0, valid)
    teacher = teacher_logits.detach().reshape(-1, teacher_vocab).index_select(0, valid)
    _check_finite_teacher(teacher)
    if compute_ce_loss:
        _check_labels_in_vocab(valid_labels, student_vocab)

    kd_tokens = _token_divergence(
        student[:, :vocab],
        teacher[:, :vocab],
        loss_type,
        temperature,
        jsd_beta,
        skew_alpha,
        scale_by_temperature_squared,
    )
    kd_sum = kd_tokens.sum()
    ce_sum, total_sum = _with_cross_entropy(kd_sum, student, valid_labels, kd_ratio, compute_ce_loss)
    with torch.no_grad():
        teacher_compared = teacher[:, :vocab].to(_compute_dtype(student))
        statistics.add(student[:, :vocab], teacher_compared.argmax(-1), _entropy_from_logits(teacher_compared))
    return _finish(kd_sum, ce_sum, total_sum, normalizer, num_valid, statistics)
