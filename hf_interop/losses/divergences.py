"""Divergences between next-token distributions, per token, and their gradients w.r.t. the student logits.

Divergences (`loss_type`), with `p_t`/`p_s` the teacher/student distributions at temperature `T`:

- `forward_kl`: KL(p_t || p_s), Hinton et al. KD (https://huggingface.co/papers/1503.02531). Mode covering.
- `reverse_kl`: KL(p_s || p_t). Mode seeking (MiniLLM, https://huggingface.co/papers/2306.08543).
- `jsd`: generalized Jensen-Shannon divergence of GKD (https://huggingface.co/papers/2306.13649) with
  `m = beta * p_t + (1 - beta) * p_s` and `beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` for `0 < beta < 1`.
  The endpoints are defined as the divergences the family interpolates: `beta = 0` is exactly forward KL and
  `beta = 1` exactly reverse KL (the formula itself would collapse to 0 there). `beta = 0.5` is the symmetric JSD.
- `skew_kl`: KL(p_t || a p_t + (1 - a) p_s) and `skew_reverse_kl`: KL(p_s || (1 - a) p_s + a p_t), DistiLLM
  (https://huggingface.co/papers/2402.03898), `a = skew_alpha`.
- `tvd`: total variation distance `0.5 * sum |p_t - p_s|`.
- `mse`: mean over the vocabulary of `(z_s / T - z_t / T) ** 2` on the logits themselves.

The `T ** 2` factor (Hinton: keeps gradient magnitudes comparable across temperatures) is on by default for
`forward_kl` only; `scale_by_temperature_squared` switches it for any loss type.

The closed forms (`_divergence_and_logit_grad`) give the values of [`token_divergence`] and the gradient that
autograd would give, without an autograd graph over `(chunk, vocab)` buffers: the chunked losses use them. The
argument checks all loss forms share live here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .names import LOSS_TYPES

if TYPE_CHECKING:
    from torch import Tensor

# --------------------------------------------------------------------------------------------------------------
# argument checks


def _check_loss_arguments(
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    skew_alpha: float,
    kd_ratio: float,
    allowed: tuple[str, ...] = LOSS_TYPES,
) -> None:
    if loss_type not in allowed:
        raise ValueError(f"loss_type={loss_type!r} is not supported here; use one of {list(allowed)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature={temperature!r} must be a finite number > 0 (1.0 leaves the logits as they are)."
        )
    for name, value in (("jsd_beta", jsd_beta), ("skew_alpha", skew_alpha), ("kd_ratio", kd_ratio)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name}={value!r} must be a number in [0, 1].")


def _check_cross_entropy_needed(kd_ratio: float, compute_ce_loss: bool) -> None:
    if not compute_ce_loss and kd_ratio < 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} < 1 weighs in the cross-entropy; pass compute_ce_loss=True.")


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _flatten_labels(labels: Tensor, leading_shape: torch.Size, argument: str) -> Tensor:
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {argument} has leading shape {tuple(leading_shape)}; "
            "pass labels aligned with the logits (shift them for causal LMs: position i predicts labels[..., i])."
        )
    return labels.reshape(-1)


def _select_valid(
    labels: Tensor, leading_shape: torch.Size, argument: str, ignore_index: int
) -> tuple[Tensor, Tensor]:
    flat_labels = _flatten_labels(labels, leading_shape, argument)
    valid = (flat_labels != ignore_index).nonzero().squeeze(-1)
    return valid, flat_labels.index_select(0, valid)


def _resolve_vocab(student_vocab: int, teacher_vocab: int, shared_vocab_size: int | None) -> int:
    if shared_vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student vocab size {student_vocab} != teacher vocab size {teacher_vocab}; if both models share a "
                "tokenizer and only the embedding matrices are padded, pass shared_vocab_size=<tokenizer length> to "
                "compare the first shared_vocab_size columns; different tokenizers need cross-tokenizer distillation."
            )
        return student_vocab
    if not isinstance(shared_vocab_size, int) or not 1 <= shared_vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"shared_vocab_size={shared_vocab_size!r} must be an int in [1, min(student vocab {student_vocab}, "
            f"teacher vocab {teacher_vocab})]; use the tokenizer length both models share."
        )
    return shared_vocab_size


def _normalizer(num_items_in_batch: int | Tensor | None, num_valid_tokens: int) -> int | Tensor:
    if num_items_in_batch is None:
        return num_valid_tokens
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch has shape {tuple(num_items_in_batch.shape)}; pass one count (an int or a "
                "0-d tensor): the number of valid tokens in the whole global batch."
            )
        return num_items_in_batch.reshape(())
    if not isinstance(num_items_in_batch, int) or num_items_in_batch < 0:
        raise ValueError(
            f"num_items_in_batch={num_items_in_batch!r} must be a non-negative int or tensor: the number of valid "
            "tokens in the whole global batch (what transformers.Trainer passes to compute_loss)."
        )
    return num_items_in_batch


def _check_labels_in_vocab(valid_labels: Tensor, vocab_size: int) -> None:
    if valid_labels.numel() and (int(valid_labels.min()) < 0 or int(valid_labels.max()) >= vocab_size):
        raise ValueError(
            f"labels hold ids in [{int(valid_labels.min())}, {int(valid_labels.max())}] outside the student vocabulary "
            f"[0, {vocab_size}); mark positions to skip with ignore_index and check the tokenizer matches the model."
        )


# --------------------------------------------------------------------------------------------------------------
# divergences


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last dim, with 0 * log 0 = 0 and no NaN gradients where p = 0."""
    p = log_p.exp()
    difference = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * difference).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space so tiny probabilities do not underflow."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _divergence_from_log_probs(
    student_log_probs: Tensor, teacher_log_probs: Tensor, loss_type: str, jsd_beta: float, skew_alpha: float
) -> Tensor:
    """Per-row divergence between two (normalised) log-distributions over the last dim."""
    if loss_type == "forward_kl":
        return _kl_from_log_probs(teacher_log_probs, student_log_probs)
    if loss_type == "reverse_kl":
        return _kl_from_log_probs(student_log_probs, teacher_log_probs)
    if loss_type == "jsd":
        if jsd_beta == 0.0:
            return _kl_from_log_probs(teacher_log_probs, student_log_probs)
        if jsd_beta == 1.0:
            return _kl_from_log_probs(student_log_probs, teacher_log_probs)
        log_mixture = _log_mixture(teacher_log_probs, student_log_probs, jsd_beta)
        return jsd_beta * _kl_from_log_probs(teacher_log_probs, log_mixture) + (1.0 - jsd_beta) * _kl_from_log_probs(
            student_log_probs, log_mixture
        )
    if loss_type == "skew_kl":
        return _kl_from_log_probs(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew_alpha))
    if loss_type == "skew_reverse_kl":
        return _kl_from_log_probs(student_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew_alpha))
    if loss_type == "tvd":
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
    raise ValueError(f"loss_type={loss_type!r} is not a divergence between distributions; use one of {LOSS_TYPES}.")


def _temperature_factor(loss_type: str, temperature: float, scale_by_temperature_squared: bool | None) -> float:
    if scale_by_temperature_squared is None:
        scale_by_temperature_squared = loss_type == "forward_kl"
    return float(temperature) ** 2 if scale_by_temperature_squared else 1.0


def _token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    skew_alpha: float,
    scale_by_temperature_squared: bool | None,
) -> Tensor:
    dtype = _compute_dtype(student_logits)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    if loss_type == "mse":
        per_token = (student - teacher).pow(2).mean(-1)
    else:
        per_token = _divergence_from_log_probs(
            F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), loss_type, jsd_beta, skew_alpha
        )
    factor = _temperature_factor(loss_type, temperature, scale_by_temperature_squared)
    return per_token * factor if factor != 1.0 else per_token


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_type: str = "forward_kl",
    *,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
) -> Tensor:
    """Per-token divergence between student and teacher next-token distributions.

    Args:
        student_logits (`torch.Tensor` of shape `(..., vocab)`):
            Student logits; gradients flow through them.
        teacher_logits (`torch.Tensor` of shape `(..., vocab)`):
            Teacher logits; detached.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            One of `LOSS_TYPES` (see the module docstring for each definition).
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides both models' logits before the softmax.
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Teacher weight in the JSD mixture; `0` is exactly forward KL, `1` exactly reverse KL.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Teacher weight in the skewed mixture of `skew_kl` / `skew_reverse_kl`.
        scale_by_temperature_squared (`bool`, *optional*):
            Multiply by `temperature ** 2`. Defaults to `True` for `forward_kl` and `False` otherwise.

    Returns:
        `torch.Tensor` of shape `(...)`: the divergence of each token, in float32 (float64 for float64 input).
    """
    _check_loss_arguments(loss_type, temperature, jsd_beta, skew_alpha, 0.0)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}; slice both to the shared vocabulary first."
        )
    return _token_divergence(
        student_logits, teacher_logits, loss_type, temperature, jsd_beta, skew_alpha, scale_by_temperature_squared
    )


# --------------------------------------------------------------------------------------------------------------
# closed-form logit gradients (for the chunked forms)


def _weighted_softmax_backward(student_probs: Tensor, weighted: Tensor) -> Tensor:
    """Gradient w.r.t. logits from `weighted = p_s * dL/dp_s`: the softmax Jacobian gives w - p_s * sum(w)."""
    return weighted.sub_(student_probs * weighted.sum(-1, keepdim=True))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    # sum(a * b, -1) as a batched dot product: one pass, no (rows, vocab) temporary. Autocast would run einsum in
    # bfloat16/float16 (a trainer with bf16=True computes the loss under autocast): these sums stay in their dtype.
    with torch.autocast(a.device.type, enabled=False):
        return torch.einsum("...v,...v->...", a, b)


@dataclass
class _ChunkDivergence:
    values: Tensor
    logit_grad: Tensor | None
    teacher_entropy: Tensor | None = None
    student_entropy: Tensor | None = None
    student_log_probs: Tensor | None = None  # at temperature 1, when available (reused for cross-entropy)


@torch.no_grad()
def _divergence_and_logit_grad(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    skew_alpha: float,
    scale_by_temperature_squared: bool | None,
    need_grad: bool,
    teacher_log_probs: Tensor | None = None,
    teacher_probs: Tensor | None = None,
) -> _ChunkDivergence:
    """Per-token divergence and its gradient w.r.t. the student logits, in closed form.

    Same values as [`token_divergence`]; the gradient is what autograd would give, derived by hand so a chunk needs
    a few `(chunk, vocab)` buffers (mostly updated in place) instead of autograd's saved graph. With `p`/`q` the
    teacher/student probabilities at temperature `T`, `z` the student's scaled logits and `w = q * dL/dq`, the
    softmax Jacobian gives `dL/dz = w - q * sum(w)`: forward KL `w = -p`; reverse KL `w = q (log q - log p)`; JSD
    `w = (1 - b) q (log q - log m)`; skew KL `w = -(1 - a) p q / m`; skew reverse KL
    `w = q (log q - log m) + q - (1 - a) q^2 / m`; TVD `w = q sign(q - p) / 2`.

    At temperature 1 it also returns both entropies and the student's log-probabilities (they come for free).

    A teacher already normalised at `temperature` can be given as `teacher_log_probs` (then `teacher_logits` is
    unused, and `teacher_log_probs` is overwritten in place) and, optionally, its `teacher_probs`: that skips the
    teacher's log-softmax and exponential over the chunk.
    """
    factor = _temperature_factor(loss_type, temperature, scale_by_temperature_squared)
    student = student_logits / temperature if temperature != 1.0 else student_logits
    teacher = None
    if teacher_log_probs is None:
        teacher = teacher_logits / temperature if temperature != 1.0 else teacher_logits
    out = _ChunkDivergence(values=student.new_zeros(()), logit_grad=None)
    if loss_type == "mse":
        difference = student - teacher
        out.values = _row_dot(difference, difference) / difference.shape[-1]
        if need_grad:
            out.logit_grad = difference.mul_(2.0 / difference.shape[-1])
    else:
        if loss_type == "jsd" and jsd_beta in (0.0, 1.0):
            loss_type = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"
        student_log_probs = F.log_softmax(student, dim=-1)
        if teacher_log_probs is None:
            teacher_log_probs = F.log_softmax(teacher, dim=-1)
        student_probs = student_log_probs.exp()
        if teacher_probs is None:
            teacher_probs = teacher_log_probs.exp()
        if temperature == 1.0:  # statistics at temperature 1 only (the callers compute their own otherwise)
            out.teacher_entropy = -_row_dot(teacher_probs, teacher_log_probs)
            out.student_entropy = -_row_dot(student_probs, student_log_probs)
            out.student_log_probs = student_log_probs
        grad = None
        if loss_type == "forward_kl":
            # sum p (log p - log q) with the difference taken first (in place): no cancellation between two sums
            out.values = _row_dot(teacher_probs, teacher_log_probs.sub_(student_log_probs))
            if need_grad:
                grad = student_probs.sub_(teacher_probs)
        elif loss_type == "reverse_kl":
            log_ratio = student_log_probs - teacher_log_probs
            out.values = _row_dot(student_probs, log_ratio)
            if need_grad:
                grad = log_ratio.sub_(out.values.unsqueeze(-1)).mul_(student_probs)
        elif loss_type == "jsd":
            log_mixture = _log_mixture(teacher_log_probs, student_log_probs, jsd_beta)  # a new tensor: 0 < beta < 1
            kl_teacher = _row_dot(teacher_probs, teacher_log_probs.sub_(log_mixture))
            log_ratio = log_mixture.neg_().add_(student_log_probs)  # log q - log m, in place
            kl_student = _row_dot(student_probs, log_ratio)
            out.values = jsd_beta * kl_teacher + (1.0 - jsd_beta) * kl_student
            if need_grad:
                grad = log_ratio.sub_(kl_student.unsqueeze(-1)).mul_(student_probs).mul_(1.0 - jsd_beta)
        elif loss_type == "skew_kl":
            log_mixture = _log_mixture(teacher_log_probs, student_log_probs, skew_alpha)
            out.values = _row_dot(teacher_probs, teacher_log_probs - log_mixture)
            if need_grad:
                weighted = (student_log_probs - log_mixture).exp_().mul_(teacher_probs).mul_(-(1.0 - skew_alpha))
                grad = _weighted_softmax_backward(student_probs, weighted)
        elif loss_type == "skew_reverse_kl":
            log_ratio = student_log_probs - _log_mixture(teacher_log_probs, student_log_probs, skew_alpha)
            out.values = _row_dot(student_probs, log_ratio)
            if need_grad:
                weighted = (
                    student_probs * log_ratio + student_probs - (1.0 - skew_alpha) * student_probs * log_ratio.exp()
                )
                grad = _weighted_softmax_backward(student_probs, weighted)
        elif loss_type == "tvd":
            difference = student_probs - teacher_probs
            out.values = 0.5 * difference.abs().sum(-1)
            if need_grad:
                grad = _weighted_softmax_backward(student_probs, difference.sign_().mul_(student_probs).mul_(0.5))
        else:
            raise ValueError(f"loss_type={loss_type!r} is not supported; use one of {LOSS_TYPES}.")
        out.logit_grad = grad
    if factor != 1.0:
        out.values = out.values * factor
    if out.logit_grad is not None and factor / temperature != 1.0:
        out.logit_grad = out.logit_grad.mul_(factor / temperature)
    return out
