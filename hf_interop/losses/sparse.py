"""Knowledge-distillation losses over next-token distributions.

Every function takes logits (or hidden states) that are ALREADY ALIGNED with `labels`: position `i` predicts
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

How the chunked forms stay cheap: for each chunk the student head runs once, the divergence and its gradient
w.r.t. the chunk's logits are computed in closed form (no autograd graph over `(chunk, vocab)` buffers), and that
gradient is pushed through the head right away into the hidden states and the head's weights; backward then only
scales what was stored. The dense and sparse forms use plain autograd and serve as the reference in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hf_interop.logging_utils import get_logger

if TYPE_CHECKING:
    from torch import Tensor

logger = get_logger(__name__)

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse")
SPARSE_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "tvd")

_TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3
_ALL_IGNORED_WARNING = (
    "every label in this batch equals ignore_index, so the distillation loss is 0.0 for it; check the labels "
    "(e.g. a prompt mask that covers whole sequences) if this happens often."
)


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


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (e.g. 1024 tokens per chunk).")


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _flatten_labels(labels: Tensor, leading_shape: torch.Size, argument: str) -> Tensor:
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {argument} has leading shape {tuple(leading_shape)}; "
            "pass labels aligned with the logits (shift them for causal LMs: position i predicts labels[..., i])."
        )
    return labels.reshape(-1)


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
    if not compute_ce_loss and kd_ratio < 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} < 1 weighs in the cross-entropy; pass compute_ce_loss=True.")
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    vocab = _resolve_vocab(student_vocab, teacher_vocab, shared_vocab_size)
    flat_labels = _flatten_labels(labels, student_logits.shape[:-1], "student_logits")
    valid = (flat_labels != ignore_index).nonzero().squeeze(-1)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    statistics = _Statistics()

    if num_valid == 0:
        logger.warning_once(_ALL_IGNORED_WARNING)
        zero = _zero_loss(student_logits)
        return _finish(zero, zero if compute_ce_loss else None, zero, normalizer, 0, statistics)

    student = student_logits.reshape(-1, student_vocab).index_select(0, valid)
    teacher = teacher_logits.detach().reshape(-1, teacher_vocab).index_select(0, valid)
    valid_labels = flat_labels.index_select(0, valid)
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
    ce_sum = None
    if compute_ce_loss:
        ce_sum = F.cross_entropy(student.to(_compute_dtype(student)), valid_labels, reduction="sum")
    total_sum = kd_sum if kd_ratio == 1.0 else kd_ratio * kd_sum + (1.0 - kd_ratio) * ce_sum
    with torch.no_grad():
        teacher_compared = teacher[:, :vocab].to(_compute_dtype(student))
        statistics.add(student[:, :vocab], teacher_compared.argmax(-1), _entropy_from_logits(teacher_compared))
    return _finish(kd_sum, ce_sum, total_sum, normalizer, num_valid, statistics)


# --------------------------------------------------------------------------------------------------------------
# output heads


class OutputHead(nn.Module):
    """hidden `(..., hidden)` -> logits `(..., vocab)` of a causal LM: its output embeddings plus post-processing.

    Holds a reference to the model's own output-embedding module (so gradients reach `lm_head`, or the input
    embeddings when they are tied), then applies the family's logit post-processing in the order the model does:
    a multiplier (`logit_scale` of Cohere, `output_multiplier`, `logits_scaling` of HyperCLOVA X), a divisor
    (`logits_scaling` of Granite), then final-logit softcapping `cap * tanh(logits / cap)` (Gemma 2/3).
    """

    def __init__(
        self,
        output_embeddings: nn.Module,
        multiplier: float | None = None,
        divisor: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.output_embeddings = output_embeddings
        self.multiplier = multiplier
        self.divisor = divisor
        self.softcap = softcap

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = self.output_embeddings(hidden_states)
        if self.multiplier is not None and self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor is not None and self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier}, divisor={self.divisor}, softcap={self.softcap}"


def output_logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The function that turns final hidden states of `model` into its logits, as its forward does.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`):
            A causal LM; a `PeftModel` is unwrapped (adapters on `lm_head` stay active).

    Returns:
        [`OutputHead`]: an `nn.Module` mapping `(..., hidden)` to `(..., vocab)`. Its parameters are the model's
        own (not copies), so gradients flow into `lm_head` or the tied input embeddings.

    Raises:
        `ValueError`: the model has no output embeddings (e.g. an ensemble: pass its logits instead).
    """
    base = model
    if hasattr(base, "get_base_model") and callable(base.get_base_model):
        base = base.get_base_model()
    output_embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output_embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); pass its "
            "logits as teacher_logits instead of teacher_hidden + teacher_head."
        )
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    model_type = str(getattr(text_config, "model_type", "") or getattr(config, "model_type", ""))
    multiplier = 1.0
    divisor = None
    logit_scale = getattr(base, "logit_scale", None)  # Cohere keeps it on the model
    if isinstance(logit_scale, (int, float)):
        multiplier *= float(logit_scale)
    output_multiplier = getattr(text_config, "output_multiplier", None)
    if isinstance(output_multiplier, (int, float)):
        multiplier *= float(output_multiplier)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)):
        if model_type.startswith("hyperclovax"):
            multiplier *= float(logits_scaling)
        else:  # Granite family divides
            divisor = float(logits_scaling)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return OutputHead(
        output_embeddings,
        multiplier=multiplier if multiplier != 1.0 else None,
        divisor=divisor,
        softcap=float(softcap) if softcap else None,
    )


def _head_parameters(head: Callable[[Tensor], Tensor]) -> list[nn.Parameter]:
    if not isinstance(head, nn.Module):
        return []
    unique: dict[int, nn.Parameter] = {}
    for parameter in head.parameters():
        if parameter.requires_grad:
            unique.setdefault(id(parameter), parameter)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------------------
# chunked form


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


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


class _ChunkRunner:
    """Loss of one chunk of student logits, its gradient w.r.t. those logits, and detached running sums.

    `kd_value_and_grad(student_logits, start, end, need_grad)` gets the chunk's detached student logits (compute
    dtype) and returns the per-token divergences, their summed gradient w.r.t. those logits (or `None`), the
    teacher's argmax, the teacher's entropy, the student's entropy (or `None`: computed here) and the number of
    vocab columns compared.
    """

    def __init__(
        self,
        valid_labels: Tensor,
        chunk_size: int,
        kd_ratio: float,
        compute_ce_loss: bool,
        kd_value_and_grad: Callable[
            [Tensor, int, int, bool], tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None, int]
        ],
    ) -> None:
        self.valid_labels = valid_labels
        self.chunk_size = chunk_size
        self.kd_ratio = kd_ratio
        self.compute_ce_loss = compute_ce_loss
        self.kd_value_and_grad = kd_value_and_grad
        self.kd_sum: Tensor | float = 0.0
        self.ce_sum: Tensor | float = 0.0
        self.statistics = _Statistics()
        self.labels_checked = False
        self.cached_student_log_probs: Tensor | None = None

    def chunk_bounds(self, num_tokens: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk_size, num_tokens)) for start in range(0, num_tokens, self.chunk_size)]

    @torch.no_grad()
    def loss_and_logit_grad(
        self, student_logits: Tensor, start: int, end: int, need_grad: bool, record: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        logits = student_logits.detach().to(_compute_dtype(student_logits))
        self.cached_student_log_probs = None
        kd_tokens, grad, teacher_argmax, teacher_entropy, student_entropy, vocab = self.kd_value_and_grad(
            logits, start, end, need_grad
        )
        kd = kd_tokens.sum()
        total = kd
        if need_grad and grad is not None and self.kd_ratio != 1.0:
            grad = grad.mul_(self.kd_ratio)
        student_log_probs = None
        ce = None
        if self.compute_ce_loss:
            if not self.labels_checked:
                _check_labels_in_vocab(self.valid_labels, logits.shape[-1])
                self.labels_checked = True
            labels = self.valid_labels[start:end]
            student_log_probs = self.cached_student_log_probs
            if student_log_probs is None:
                student_log_probs = F.log_softmax(logits, dim=-1)
            ce = -student_log_probs.gather(-1, labels.unsqueeze(-1)).sum()
            if self.kd_ratio != 1.0:
                total = self.kd_ratio * kd + (1.0 - self.kd_ratio) * ce
                if need_grad:
                    ce_grad = student_log_probs.exp()
                    ce_grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
                    grad = (
                        ce_grad.mul_(1.0 - self.kd_ratio)
                        if grad is None
                        else grad.add_(ce_grad, alpha=1.0 - self.kd_ratio)
                    )
        if record:
            self.kd_sum = self.kd_sum + kd
            if ce is not None:
                self.ce_sum = self.ce_sum + ce
            compared = logits[..., :vocab]
            if student_entropy is not None:
                pass
            elif student_log_probs is not None and vocab == logits.shape[-1]:
                student_entropy = -_row_dot(student_log_probs.exp(), student_log_probs)
            else:
                student_entropy = _entropy_from_logits(compared)
            self.statistics.add_precomputed(compared.argmax(-1), teacher_argmax, teacher_entropy, student_entropy)
        return total, grad


class _FusedChunkedLoss(torch.autograd.Function):
    """Chunk loop that computes each chunk's gradients right away (w.r.t. the hidden chunk and the head's
    parameters) and keeps only those: the student's logits never outlive their chunk, and backward is a scale."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, runner: _ChunkRunner, head: Callable, need_hidden_grad: bool, *parameters: Tensor
    ) -> Tensor:
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        parameter_grads: list[Tensor | None] = [None] * len(parameters)
        total = None
        for start, end in runner.chunk_bounds(hidden.shape[0]):
            hidden_chunk = hidden[start:end].detach()
            if need_hidden_grad:
                hidden_chunk.requires_grad_(True)
            with torch.enable_grad():
                logits = head(hidden_chunk)
            chunk_total, logit_grad = runner.loss_and_logit_grad(logits, start, end, need_grad=True)
            inputs = ([hidden_chunk] if need_hidden_grad else []) + list(parameters)
            if logits.requires_grad and logit_grad is not None:
                grads = torch.autograd.grad(
                    logits, inputs, grad_outputs=logit_grad.to(logits.dtype), allow_unused=True
                )
                if need_hidden_grad:
                    grad_hidden[start:end] = grads[0]
                    grads = grads[1:]
                for index, grad in enumerate(grads):
                    if grad is None:
                        continue
                    if parameter_grads[index] is None:
                        parameter_grads[index] = grad.float() if _low_precision(grad.dtype) else grad
                    else:
                        # in place with type promotion: a bfloat16 chunk gradient adds into the float32 sum
                        # without a float32 copy of it (the head's gradient is vocab x hidden per chunk)
                        parameter_grads[index].add_(grad)
            del logits, logit_grad
            total = chunk_total if total is None else total + chunk_total
        ctx.grad_hidden = grad_hidden
        ctx.parameter_grads = parameter_grads
        ctx.parameter_dtypes = [parameter.dtype for parameter in parameters]
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden = None
        if ctx.grad_hidden is not None:
            grad_hidden = ctx.grad_hidden * grad_total.to(ctx.grad_hidden.dtype)
        parameter_grads = [
            None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype)
            for grad, dtype in zip(ctx.parameter_grads, ctx.parameter_dtypes, strict=True)
        ]
        ctx.grad_hidden = ctx.parameter_grads = None
        return (grad_hidden, None, None, None, *parameter_grads)


class _ChunkLogitsLoss(torch.autograd.Function):
    """One chunk's loss on its student logits, for the checkpointed path: the logit gradient it saves is dropped by
    `torch.utils.checkpoint` and recomputed, with the logits, in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, runner: _ChunkRunner, start: int, end: int, record: bool) -> Tensor:
        total, logit_grad = runner.loss_and_logit_grad(logits, start, end, need_grad=True, record=record)
        ctx.save_for_backward(logit_grad.to(logits.dtype) if logit_grad is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        (logit_grad,) = ctx.saved_tensors
        grad = None if logit_grad is None else logit_grad * grad_total.to(logit_grad.dtype)
        return grad, None, None, None, None


def _run_chunks(
    student_hidden: Tensor, runner: _ChunkRunner, student_head: Callable[[Tensor], Tensor], fused_backward: bool
) -> Tensor:
    parameters = _head_parameters(student_head)
    need_hidden_grad = student_hidden.requires_grad
    bounds = runner.chunk_bounds(len(student_hidden))
    # a plain callable may close over tensors that require grad: only checkpointing reaches those
    is_module = isinstance(student_head, nn.Module)
    if not torch.is_grad_enabled() or (is_module and not (need_hidden_grad or parameters)):
        with torch.no_grad():
            totals = [
                runner.loss_and_logit_grad(student_head(student_hidden[s:e]), s, e, need_grad=False)[0]
                for s, e in bounds
            ]
        return torch.stack(totals).sum()
    if fused_backward and is_module:
        return _FusedChunkedLoss.apply(student_hidden, runner, student_head, need_hidden_grad, *parameters)
    from torch.utils.checkpoint import checkpoint

    recomputing = [False]

    def run_chunk(hidden_chunk: Tensor, start: int, end: int) -> Tensor:
        # the recomputation in backward must not count the chunk's statistics twice
        return _ChunkLogitsLoss.apply(student_head(hidden_chunk), runner, start, end, not recomputing[0])

    totals = [checkpoint(run_chunk, student_hidden[s:e], s, e, use_reentrant=False) for s, e in bounds]
    recomputing[0] = True
    return torch.stack(totals).sum()


def _select_valid(
    labels: Tensor, leading_shape: torch.Size, argument: str, ignore_index: int
) -> tuple[Tensor, Tensor]:
    flat_labels = _flatten_labels(labels, leading_shape, argument)
    valid = (flat_labels != ignore_index).nonzero().squeeze(-1)
    return valid, flat_labels.index_select(0, valid)


def _take_rows(tensor: Tensor, valid: Tensor) -> Tensor:
    """`tensor[valid]` for a 2-d tensor; a view when every row is valid (no copy, no scatter in backward)."""
    if valid.numel() == tensor.shape[0]:
        return tensor
    return tensor.index_select(0, valid)


def _zero_output(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    normalizer: int | Tensor,
    compute_ce_loss: bool,
) -> DistillationLossOutput:
    logger.warning_once(_ALL_IGNORED_WARNING)
    zero = _zero_loss(student_hidden)
    for parameter in _head_parameters(student_head):
        # keep the head in the graph so data-parallel wrappers see a (zero) gradient for it
        zero = zero + _zero_loss(parameter)
    return _finish(zero, zero.detach() if compute_ce_loss else None, zero, normalizer, 0, _Statistics())


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: Callable[[Tensor], Tensor] | None = None,
    teacher_logits: Tensor | None = None,
    chunk_size: int = 1024,
    shared_vocab_size: int | None = None,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    compute_ce_loss: bool = True,
    fused_backward: bool = True,
) -> DistillationLossOutput:
    """Memory-efficient [`distillation_loss`] from final hidden states and output heads.

    Valid tokens are gathered and processed `chunk_size` at a time: each chunk's student logits are computed,
    used and dropped, the teacher's chunk is computed under `no_grad`, so neither model's full `(batch, seq,
    vocab)` logits tensor exists. Values and gradients equal the dense form's (to float32 rounding).

    Args:
        student_hidden (`torch.Tensor` of shape `(batch, seq, hidden)` or `(tokens, hidden)`):
            Final hidden states of the student (after its final norm), aligned with `labels`.
        student_head (`Callable`):
            hidden -> logits of the student, usually `output_logits_fn(student)`. When it is an `nn.Module`, its
            parameters that require grad (lm_head, or the tied input embeddings) receive their gradients through the
            fused path. Any other callable runs under checkpointing, so tensors it closes over get gradients too.
        labels (`torch.LongTensor` of shape `(batch, seq)` or `(tokens,)`):
            Target ids; positions equal to `ignore_index` are skipped before any logits are computed.
        teacher_hidden (`torch.Tensor`, *optional*):
            Final hidden states of the teacher, same leading shape; used with `teacher_head`.
        teacher_head (`Callable`, *optional*):
            hidden -> logits of the teacher (`output_logits_fn(teacher)`), run under `no_grad`.
        teacher_logits (`torch.Tensor`, *optional*):
            Precomputed teacher logits (or log-probabilities, e.g. of an ensemble) of shape `(..., vocab_t)`,
            instead of `teacher_hidden` + `teacher_head`. Never receive gradients.
        chunk_size (`int`, *optional*, defaults to `1024`):
            Valid tokens per chunk; higher is a little faster and uses more memory (about
            `chunk_size * vocab * 4 bytes` times a small factor).
        fused_backward (`bool`, *optional*, defaults to `True`):
            Compute each chunk's gradients during the forward pass (fastest: the student head runs once per chunk).
            `False` uses `torch.utils.checkpoint` per chunk instead (the head and the teacher chunk run again in
            backward): use it when the head's parameters are sharded and only materialised inside a module call
            (DeepSpeed ZeRO-3, FSDP).
        shared_vocab_size, loss_type, temperature, jsd_beta, skew_alpha, scale_by_temperature_squared, kd_ratio,
        ignore_index, num_items_in_batch, compute_ce_loss:
            As in [`distillation_loss`].

    Returns:
        [`DistillationLossOutput`]; only `loss` carries gradients (`kd_loss` and `ce_loss` are detached, for logs).
    """
    _check_loss_arguments(loss_type, temperature, jsd_beta, skew_alpha, kd_ratio)
    _check_chunk_size(chunk_size)
    if not compute_ce_loss and kd_ratio < 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} < 1 weighs in the cross-entropy; pass compute_ce_loss=True.")
    if teacher_logits is not None and (teacher_hidden is not None or teacher_head is not None):
        raise ValueError(
            "pass either teacher_logits or teacher_hidden + teacher_head, not both (teacher_logits was given along "
            "with teacher_hidden/teacher_head)."
        )
    if teacher_logits is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError(
            "the teacher is missing: pass teacher_hidden and teacher_head (e.g. output_logits_fn(teacher)), or "
            f"precomputed teacher_logits (got teacher_hidden={'set' if teacher_hidden is not None else None}, "
            f"teacher_head={'set' if teacher_head is not None else None})."
        )
    teacher_input = teacher_logits if teacher_logits is not None else teacher_hidden
    teacher_argument = "teacher_logits" if teacher_logits is not None else "teacher_hidden"
    if teacher_input.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"{teacher_argument} shape {tuple(teacher_input.shape)} and student_hidden shape "
            f"{tuple(student_hidden.shape)} differ before the last dim; both must be aligned with labels."
        )
    valid, valid_labels = _select_valid(labels, student_hidden.shape[:-1], "student_hidden", ignore_index)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    if num_valid == 0:
        return _zero_output(student_hidden, student_head, normalizer, compute_ce_loss)

    hidden = _take_rows(student_hidden.reshape(-1, student_hidden.shape[-1]), valid)
    teacher_flat = teacher_input.detach().reshape(-1, teacher_input.shape[-1])
    if teacher_logits is None:
        teacher_flat = _take_rows(teacher_flat, valid)
    teacher_row_sums: list[Tensor] = []

    def kd_value_and_grad(
        student_logits: Tensor, start: int, end: int, need_grad: bool
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None, int]:
        if teacher_logits is not None:
            teacher_chunk = teacher_flat.index_select(0, valid[start:end])
        else:
            teacher_chunk = teacher_head(teacher_flat[start:end])
        student_vocab = student_logits.shape[-1]
        vocab = _resolve_vocab(student_vocab, teacher_chunk.shape[-1], shared_vocab_size)
        teacher_chunk = teacher_chunk[..., :vocab].to(student_logits.dtype)
        # one cheap reduction per chunk: the row sums are finite iff the teacher's logits are; a non-finite
        # teacher is reported after the loop (a single host sync)
        teacher_row_sums.append(teacher_chunk.sum(-1))
        divergence = _divergence_and_logit_grad(
            student_logits[..., :vocab], teacher_chunk, loss_type, temperature, jsd_beta, skew_alpha,
            scale_by_temperature_squared, need_grad,
        )  # fmt: skip
        teacher_entropy = divergence.teacher_entropy
        if teacher_entropy is None:
            teacher_entropy = _entropy_from_logits(teacher_chunk)
        grad = divergence.logit_grad
        if grad is not None and vocab < student_vocab:
            grad = F.pad(grad, (0, student_vocab - vocab))
        if vocab == student_vocab and divergence.student_log_probs is not None:
            runner.cached_student_log_probs = divergence.student_log_probs
        return divergence.values, grad, teacher_chunk.argmax(-1), teacher_entropy, divergence.student_entropy, vocab

    runner = _ChunkRunner(valid_labels, chunk_size, kd_ratio, compute_ce_loss, kd_value_and_grad)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    if not bool(torch.isfinite(torch.cat(teacher_row_sums)).all()):
        source = "teacher_logits" if teacher_logits is not None else "the teacher head's logits"
        raise ValueError(
            f"{source} hold non-finite values (NaN or inf) on valid tokens; the teacher's forward pass overflowed "
            "or its weights are broken (try teacher_dtype='float32' or 'bfloat16' instead of 'float16')."
        )
    return _finish(
        torch.as_tensor(runner.kd_sum, device=total_sum.device, dtype=total_sum.dtype),
        torch.as_tensor(runner.ce_sum, device=total_sum.device, dtype=total_sum.dtype) if compute_ce_loss else None,
        total_sum,
        normalizer,
        num_valid,
        runner.statistics,
    )


# --------------------------------------------------------------------------------------------------------------
# sparse forms (cached top-k teacher distribution + tail bucket)


def _flatten_sparse_teacher(
    teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, teacher_tail_logprob: Tensor, leading_shape: torch.Size
) -> tuple[Tensor, Tensor, Tensor]:
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or tuple(teacher_topk_ids.shape[:-1]) != tuple(
        leading_shape
    ):
        raise ValueError(
            f"teacher_topk_ids shape {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs shape "
            f"{tuple(teacher_topk_logprobs.shape)} must both be {(*leading_shape, 'k')} (aligned with labels)."
        )
    if tuple(teacher_tail_logprob.shape) != tuple(leading_shape):
        raise ValueError(
            f"teacher_tail_logprob shape {tuple(teacher_tail_logprob.shape)} must be {tuple(leading_shape)} "
            "(one tail log-mass per token, aligned with labels)."
        )
    top_k = teacher_topk_ids.shape[-1]
    return (
        teacher_topk_ids.reshape(-1, top_k),
        teacher_topk_logprobs.detach().reshape(-1, top_k),
        teacher_tail_logprob.detach().reshape(-1),
    )


def _check_sparse_teacher(ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor, vocab: int) -> None:
    """Checks on the valid rows of a cached teacher (small tensors: `(tokens, k)`)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"teacher_topk_ids hold ids in [{int(ids.min())}, {int(ids.max())}] outside the compared vocabulary "
            f"[0, {vocab}); the cache was made with another tokenizer, or pass shared_vocab_size=<teacher vocab>."
        )
    for name, tensor in (("teacher_topk_logprobs", topk_logprobs), ("teacher_tail_logprob", tail_logprob)):
        bad = torch.isnan(tensor) | (tensor == float("inf"))
        if bool(bad.any()):
            raise ValueError(
                f"{name} hold {int(bad.sum())} NaN/+inf values on valid tokens; the teacher cache is corrupt "
                "(rebuild it with cache_teacher_logits)."
            )


def _sparse_bucket_log_probs(
    student_logits: Tensor,
    ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    temperature: float,
    cache_temperature: float,
    teacher_vocab_size: int,
) -> tuple[Tensor, Tensor]:
    """Student and teacher as k+1 buckets (the teacher's top-k ids, then everything else), as log-probabilities."""
    dtype = _compute_dtype(student_logits)
    scaled = student_logits.to(dtype)
    if temperature != 1.0:
        scaled = scaled / temperature
    log_normalizer = torch.logsumexp(scaled, dim=-1, keepdim=True)
    student_top = scaled.gather(-1, ids) - log_normalizer
    # the student's tail: log of its mass outside the teacher's ids, summed directly (no 1 - sum cancellation);
    # a very negative finite fill (not -inf) keeps the gradient finite when the top-k covers the whole vocabulary
    outside = scaled.scatter(-1, ids, torch.finfo(dtype).min)
    student_tail = torch.logsumexp(outside, dim=-1) - log_normalizer.squeeze(-1)
    student_buckets = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    teacher_buckets = _teacher_bucket_log_probs(
        topk_logprobs, tail_logprob, temperature, cache_temperature, teacher_vocab_size, dtype
    )
    return student_buckets, teacher_buckets


def _teacher_bucket_log_probs(
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    temperature: float,
    cache_temperature: float,
    teacher_vocab_size: int,
    dtype: torch.dtype,
) -> Tensor:
    """The cached teacher as k+1 bucket log-probabilities at the training temperature (re-tempered if needed)."""
    top_k = topk_logprobs.shape[-1]
    teacher_top = topk_logprobs.to(dtype)
    teacher_tail = tail_logprob.to(dtype)
    tail_tokens = teacher_vocab_size - top_k
    if tail_tokens <= 0:
        teacher_tail = torch.full_like(teacher_tail, -math.inf)
    else:
        # a cache rounds a tiny tail to log(0) = -inf; a floor at float32's smallest normal keeps reverse KL finite
        teacher_tail = teacher_tail.clamp_min(_TAIL_FLOOR)
    if temperature != cache_temperature:
        # Re-tempering: p_T(v) is proportional to p_cache(v) ** (cache_temperature / temperature), exact for the top-k
        # ids. The tail's individual probabilities are unknown; we spread the tail mass uniformly over its
        # `vocab - k` tokens (the maximum-entropy assumption), which gives the tail weight
        # (vocab - k) ** (1 - r) * tail ** r. This is exact for a uniform tail, an upper bound of the true
        # re-tempered tail when temperature > cache_temperature and a lower bound when it is smaller (Jensen).
        ratio = cache_temperature / temperature
        teacher_top = teacher_top * ratio
        if tail_tokens > 0:
            teacher_tail = teacher_tail * ratio + (1.0 - ratio) * math.log(tail_tokens)
    # renormalising also absorbs the float16 rounding of a cache, so the buckets always sum to exactly 1
    return F.log_softmax(torch.cat([teacher_top, teacher_tail.unsqueeze(-1)], dim=-1), dim=-1)


def _check_tail_prior(tail_prior_logprobs: Tensor, vocab: int) -> None:
    if tail_prior_logprobs.dim() != 1 or tail_prior_logprobs.shape[0] != vocab:
        raise ValueError(
            f"teacher_tail_prior_logprobs shape {tuple(tail_prior_logprobs.shape)} must be ({vocab},): one "
            "log-probability per token of the compared vocabulary (e.g. TeacherLogitsCache.tail_prior_logprobs())."
        )
    if not bool(torch.isfinite(tail_prior_logprobs).all()):
        raise ValueError(
            "teacher_tail_prior_logprobs hold NaN or infinite values; every token needs a finite log-probability "
            "(a probability > 0), e.g. TeacherLogitsCache.tail_prior_logprobs()."
        )


def _resolve_tail_prior(tail_prior_logprobs: Tensor | None, vocab: int, top_k: int) -> Tensor | None:
    """The checked prior, or `None` when there is none or no tail to spread (top-k = whole vocabulary)."""
    if tail_prior_logprobs is None:
        return None
    _check_tail_prior(tail_prior_logprobs, vocab)
    return tail_prior_logprobs.detach() if top_k < vocab else None


def _teacher_dense_log_probs(
    ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    tail_prior_logprobs: Tensor,
    temperature: float,
    cache_temperature: float,
    dtype: torch.dtype,
    with_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The cached teacher over the whole vocabulary, its tail spread in proportion to a prior; at `temperature`.

    At the cache's temperature the top-k ids keep their cached probabilities and every other token `v` gets
    `tail * prior(v) / prior(outside the top-k)`. Re-tempering raises that whole distribution to the power
    `cache_temperature / temperature` and renormalises (exact under the prior's assumption about the tail).
    With `with_probs` it returns `(log_probs, probs)`; at the cache's temperature both are built from the prior's
    probabilities (computed once per vocabulary, not per row) without an exponential over the `(rows, vocab)` grid.
    """
    vocab = tail_prior_logprobs.shape[0]
    rows = ids.shape[0]
    # at the cache temperature: normalised k+1 buckets (absorbs float16 rounding; floors an underflowed tail)
    buckets = _teacher_bucket_log_probs(topk_logprobs, tail_logprob, 1.0, 1.0, vocab, dtype)
    log_prior = tail_prior_logprobs.to(device=ids.device, dtype=dtype)
    # The prior's mass outside each row's ids, summed directly (no 1 - sum cancellation). That grid of prior
    # probabilities, rescaled per row, is the teacher's probabilities outside the ids.
    probs = log_prior.exp().expand(rows, vocab).clone().scatter_(-1, ids, 0.0)
    outside = probs.sum(-1, keepdim=True)
    log_scale = buckets[..., -1:] - outside.log()
    dense = (log_prior + log_scale).scatter_(-1, ids, buckets[..., :-1])
    if temperature != cache_temperature:
        dense = F.log_softmax(dense * (cache_temperature / temperature), dim=-1)
        return (dense, dense.exp()) if with_probs else dense
    if not with_probs:
        return dense
    return dense, probs.mul_(log_scale.exp()).scatter_(-1, ids, buckets[..., :-1].exp())


@torch.no_grad()
def _sparse_teacher_statistics(ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor, dtype: torch.dtype):
    teacher_argmax = ids.gather(-1, topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    cached = F.log_softmax(torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1).to(dtype), dim=-1)
    teacher_entropy = -(cached.exp() * torch.where(torch.isneginf(cached), 0.0, cached)).sum(-1)
    return teacher_argmax, teacher_entropy


@torch.no_grad()
def _sparse_divergence_and_logit_grad(
    student_logits: Tensor,
    ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    loss_type: str,
    temperature: float,
    cache_temperature: float,
    jsd_beta: float,
    scale_by_temperature_squared: bool | None,
    teacher_vocab_size: int,
    need_grad: bool,
    tail_prior_logprobs: Tensor | None = None,
) -> _ChunkDivergence:
    """Sparse divergence per token and its gradient w.r.t. the student logits, without autograd over the vocab.

    Autograd runs only on the small `(tokens, k + 1)` bucket tensor, giving `g = dL/db` for the student's bucket
    log-probabilities `b`. With `q = softmax(z)`, `b_j = z_{id_j} - lse(z)` and `b_tail = log(Q_tail)`,
    `Q_tail = sum of q outside the ids`, the chain rule gives `dL/dz_v = g_j - G q_v` at `v = id_j` and
    `q_v (g_tail / Q_tail - G)` elsewhere, with `G = sum(g)`.

    With `tail_prior_logprobs` the teacher is spread over the whole vocabulary (see `_teacher_dense_log_probs`) and
    the divergence and its gradient are the dense closed forms of [`chunked_distillation_loss`].
    """
    dtype = student_logits.dtype
    if tail_prior_logprobs is not None:
        teacher_log_probs, teacher_probs = _teacher_dense_log_probs(
            ids, topk_logprobs, tail_logprob, tail_prior_logprobs, temperature, cache_temperature, dtype, True
        )
        return _divergence_and_logit_grad(
            student_logits, None, loss_type, temperature, jsd_beta, 0.0, scale_by_temperature_squared, need_grad,
            teacher_log_probs=teacher_log_probs, teacher_probs=teacher_probs,
        )  # fmt: skip
    scaled = student_logits / temperature if temperature != 1.0 else student_logits
    log_probs = F.log_softmax(scaled, dim=-1)
    student_top = log_probs.gather(-1, ids)
    probs = log_probs.exp()
    out = _ChunkDivergence(values=scaled.new_zeros(()), logit_grad=None)
    if temperature == 1.0:
        out.student_entropy = -_row_dot(probs, log_probs)
        out.student_log_probs = log_probs
    # The student's tail: its mass outside the teacher's ids, summed directly (no 1 - sum cancellation) from `probs`
    # with the ids' entries zeroed (the gradient below overwrites those entries). One read of the chunk, where a
    # log-sum-exp over a scattered copy took four passes and two exponentials per entry.
    tail_mass = probs.scatter_(-1, ids, 0.0).sum(-1)
    student_tail = tail_mass.log()
    # Below this the sum is made of subnormal probabilities and loses precision (or underflows to 0, log = -inf):
    # those rows take the log-sum-exp of their log-probabilities, which stays exact at any magnitude.
    finfo = torch.finfo(dtype)
    imprecise = (tail_mass < scaled.shape[-1] * finfo.tiny / finfo.eps).nonzero().squeeze(-1)
    if imprecise.numel():
        rows = log_probs.index_select(0, imprecise).scatter_(-1, ids.index_select(0, imprecise), finfo.min)
        student_tail.index_copy_(0, imprecise, torch.logsumexp(rows, dim=-1))
    teacher_buckets = _teacher_bucket_log_probs(
        topk_logprobs, tail_logprob, temperature, cache_temperature, teacher_vocab_size, dtype
    )
    student_buckets = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    factor = _temperature_factor(loss_type, temperature, scale_by_temperature_squared)
    with torch.enable_grad():
        student_buckets.requires_grad_(need_grad)
        values = _divergence_from_log_probs(student_buckets, teacher_buckets, loss_type, jsd_beta, 0.0)
        if factor != 1.0:
            values = values * factor
        bucket_grad = torch.autograd.grad(values.sum(), student_buckets)[0] if need_grad else None
    out.values = values.detach()
    if need_grad:
        total = bucket_grad.sum(-1, keepdim=True)
        tail_grad = bucket_grad[..., -1:]
        tail_mass = tail_mass.unsqueeze(-1)
        per_tail_mass = torch.where(tail_mass > 0, tail_grad / tail_mass, torch.zeros_like(tail_grad))
        grad = probs.mul_(per_tail_mass - total)
        if imprecise.numel():
            # There 1 / tail mass can overflow (forward KL: inf * a subnormal probability, 0 * inf = NaN): take the
            # within-tail distribution q_v / Q_tail from log-probabilities instead. The ids' entries are overwritten
            # below, whatever they hold here.
            rows_log_probs = log_probs.index_select(0, imprecise)
            within_tail = rows_log_probs.sub(student_tail.index_select(0, imprecise).unsqueeze(-1)).exp_()
            rows_grad = within_tail.mul_(tail_grad.index_select(0, imprecise)).sub_(
                rows_log_probs.exp_().mul_(total.index_select(0, imprecise))
            )
            grad.index_copy_(0, imprecise, rows_grad)
        grad.scatter_(-1, ids, bucket_grad[..., :-1] - student_top.exp() * total)
        out.logit_grad = grad.div_(temperature) if temperature != 1.0 else grad
    return out


def _sparse_kd_per_token(
    student_logits: Tensor,
    ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    loss_type: str,
    temperature: float,
    cache_temperature: float,
    jsd_beta: float,
    scale_by_temperature_squared: bool | None,
    vocab: int,
    teacher_vocab_size: int,
    tail_prior_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if tail_prior_logprobs is not None:
        dtype = _compute_dtype(student_logits)
        scaled = student_logits[..., :vocab].to(dtype)
        if temperature != 1.0:
            scaled = scaled / temperature
        teacher = _teacher_dense_log_probs(
            ids, topk_logprobs, tail_logprob, tail_prior_logprobs, temperature, cache_temperature, dtype
        )
        kd_tokens = _divergence_from_log_probs(F.log_softmax(scaled, dim=-1), teacher, loss_type, jsd_beta, 0.0)
    else:
        student_buckets, teacher_buckets = _sparse_bucket_log_probs(
            student_logits[..., :vocab],
            ids,
            topk_logprobs,
            tail_logprob,
            temperature,
            cache_temperature,
            teacher_vocab_size,
        )
        kd_tokens = _divergence_from_log_probs(student_buckets, teacher_buckets, loss_type, jsd_beta, 0.0)
    factor = _temperature_factor(loss_type, temperature, scale_by_temperature_squared)
    if factor != 1.0:
        kd_tokens = kd_tokens * factor
    teacher_argmax, teacher_entropy = _sparse_teacher_statistics(ids, topk_logprobs, tail_logprob, kd_tokens.dtype)
    return kd_tokens, teacher_argmax, teacher_entropy


def _check_sparse_arguments(
    loss_type: str, temperature: float, cache_temperature: float, jsd_beta: float, kd_ratio: float
) -> None:
    _check_loss_arguments(loss_type, temperature, jsd_beta, 0.0, kd_ratio, allowed=SPARSE_LOSS_TYPES)
    if not (
        isinstance(cache_temperature, (int, float)) and math.isfinite(cache_temperature) and cache_temperature > 0
    ):
        raise ValueError(
            f"cache_temperature={cache_temperature!r} must be a finite number > 0: the temperature the teacher cache "
            "was made with (its manifest's 'temperature')."
        )


def _resolve_sparse_vocab(
    student_vocab: int, shared_vocab_size: int | None, teacher_vocab_size: int | None, top_k: int
) -> tuple[int, int]:
    vocab = _resolve_vocab(student_vocab, student_vocab, shared_vocab_size)
    if teacher_vocab_size is None:
        teacher_vocab_size = vocab
    if not isinstance(teacher_vocab_size, int) or teacher_vocab_size < top_k:
        raise ValueError(
            f"teacher_vocab_size={teacher_vocab_size!r} must be an int >= top_k ({top_k}): the vocabulary size of the "
            "teacher that made the cache (its manifest's 'vocab_size')."
        )
    return vocab, teacher_vocab_size


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_tail_logprob: Tensor,
    labels: Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    cache_temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    shared_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    compute_ce_loss: bool = True,
    teacher_tail_prior_logprobs: Tensor | None = None,
) -> DistillationLossOutput:
    """Distillation loss against a cached sparse teacher: its top-k log-probabilities plus the leftover tail mass.

    Both distributions become k+1 buckets: the teacher's top-k token ids, and a tail bucket holding everything
    else (for the student: its probability mass outside those ids, computed exactly). The divergence is taken
    between these bucket distributions; with k equal to the vocabulary size it is exactly the dense loss. The
    buckets match the teacher's top-k probabilities and the student's total mass outside them, but leave the
    student's distribution INSIDE the tail unconstrained (it keeps its own shape, scaled to the tail mass).

    With `teacher_tail_prior_logprobs`, the teacher's tail mass at each position is instead spread over the tokens
    outside its top-k in proportion to a prior (usually the teacher's average next-token distribution over the
    cache, [`TeacherLogitsCache.tail_prior_logprobs`]) and the divergence is taken over the whole vocabulary. This
    gives the student's tail a shape to learn (which tokens are frequent at all), at the cost of a dense
    `(tokens, vocab)` teacher tensor per chunk (no teacher forward). It helps students far from the teacher (random
    initialisation); a student initialised from the teacher already has a context-dependent tail, which a fixed
    prior overrides, so the buckets do better there (`benchmarks/results/teacher_cache.md`).

    Re-tempering: the cache stores log-probabilities at `cache_temperature`. For another training `temperature`,
    the top-k buckets are re-tempered exactly (`p_T ∝ p_cache ** (cache_temperature / temperature)`); the tail is
    assumed to spread uniformly over the `teacher_vocab_size - k` tokens outside the top-k (maximum entropy), which
    is exact for a uniform tail and otherwise over-estimates the re-tempered tail mass when
    `temperature > cache_temperature` (under-estimates it when smaller). Cache at the training temperature to
    avoid the approximation.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, seq, vocab)` or `(tokens, vocab)`):
            Student logits aligned with `labels`.
        teacher_topk_ids (`torch.Tensor` of shape `(..., k)`):
            Token ids of the teacher's top-k (any integer dtype, e.g. uint16 from the cache).
        teacher_topk_logprobs (`torch.Tensor` of shape `(..., k)`):
            The teacher's log-probabilities of those ids at `cache_temperature` (e.g. float16 from the cache).
        teacher_tail_logprob (`torch.Tensor` of shape `(...)`):
            `log(1 - sum(top-k probabilities))`.
        labels (`torch.LongTensor` of shape `(batch, seq)` or `(tokens,)`):
            Target ids; positions equal to `ignore_index` (and whatever the cache holds there) are skipped.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            One of `SPARSE_LOSS_TYPES`.
        cache_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature the cache was computed at (its manifest's `temperature`).
        shared_vocab_size (`int`, *optional*):
            Compare over the student's first `shared_vocab_size` logits (padded student embeddings).
        teacher_vocab_size (`int`, *optional*):
            Teacher vocabulary size, used only by the re-tempering of the tail; defaults to the compared vocabulary.
        skew_alpha (`float`, *optional*):
            Accepted for a uniform call signature; unused (skew losses have no sparse form here).
        teacher_tail_prior_logprobs (`torch.Tensor` of shape `(vocab,)`, *optional*):
            Log-probabilities (any normalisation; all finite) over the compared vocabulary that shape the teacher's
            tail (see above). `None` (default): k+1 buckets. Re-tempering then raises the whole spread teacher
            distribution to the power `cache_temperature / temperature` (exact if the prior's assumption holds) and
            `teacher_vocab_size` is unused.
        temperature, jsd_beta, scale_by_temperature_squared, kd_ratio, ignore_index, num_items_in_batch,
        compute_ce_loss:
            As in [`distillation_loss`].

    Returns:
        [`DistillationLossOutput`]; `teacher_entropy` is the entropy of the k+1 cached buckets (a lower bound).
    """
    _check_sparse_arguments(loss_type, temperature, cache_temperature, jsd_beta, kd_ratio)
    if not compute_ce_loss and kd_ratio < 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} < 1 weighs in the cross-entropy; pass compute_ce_loss=True.")
    leading_shape = student_logits.shape[:-1]
    student_vocab = student_logits.shape[-1]
    ids, topk_logprobs, tail_logprob = _flatten_sparse_teacher(
        teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, leading_shape
    )
    vocab, teacher_vocab_size = _resolve_sparse_vocab(
        student_vocab, shared_vocab_size, teacher_vocab_size, ids.shape[-1]
    )
    valid, valid_labels = _select_valid(labels, leading_shape, "student_logits", ignore_index)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    statistics = _Statistics()
    if num_valid == 0:
        logger.warning_once(_ALL_IGNORED_WARNING)
        zero = _zero_loss(student_logits)
        return _finish(zero, zero if compute_ce_loss else None, zero, normalizer, 0, statistics)

    student = student_logits.reshape(-1, student_vocab).index_select(0, valid)
    ids = ids.index_select(0, valid).long()
    topk_logprobs = topk_logprobs.index_select(0, valid)
    tail_logprob = tail_logprob.index_select(0, valid)
    _check_sparse_teacher(ids, topk_logprobs, tail_logprob, vocab)
    tail_prior = _resolve_tail_prior(teacher_tail_prior_logprobs, vocab, ids.shape[-1])
    if compute_ce_loss:
        _check_labels_in_vocab(valid_labels, student_vocab)
    kd_tokens, teacher_argmax, teacher_entropy = _sparse_kd_per_token(
        student, ids, topk_logprobs, tail_logprob, loss_type, temperature, cache_temperature, jsd_beta,
        scale_by_temperature_squared, vocab, teacher_vocab_size, tail_prior,
    )  # fmt: skip
    kd_sum = kd_tokens.sum()
    ce_sum = None
    if compute_ce_loss:
        ce_sum = F.cross_entropy(student.to(_compute_dtype(student)), valid_labels, reduction="sum")
    total_sum = kd_sum if kd_ratio == 1.0 else kd_ratio * kd_sum + (1.0 - kd_ratio) * ce_sum
    statistics.add(student[:, :vocab], teacher_argmax, teacher_entropy)
    return _finish(kd_sum, ce_sum, total_sum, normalizer, num_valid, statistics)


def chunked_sparse_distillation_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_tail_logprob: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    cache_temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    shared_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    compute_ce_loss: bool = True,
    fused_backward: bool = True,
    teacher_tail_prior_logprobs: Tensor | None = None,
) -> DistillationLossOutput:
    """Memory-efficient [`sparse_distillation_loss`] from the student's final hidden states and output head.

    Valid tokens are processed `chunk_size` at a time, as in [`chunked_distillation_loss`]; the cached teacher
    tensors are small (`(..., k)`) and are sliced per chunk. Same values and gradients as the dense sparse form.

    Args:
        student_hidden (`torch.Tensor` of shape `(batch, seq, hidden)` or `(tokens, hidden)`):
            Final hidden states of the student, aligned with `labels`.
        student_head (`Callable`):
            hidden -> logits, usually `output_logits_fn(student)`.
        chunk_size, fused_backward:
            As in [`chunked_distillation_loss`].
        teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, labels, teacher_tail_prior_logprobs, and
        the other keyword arguments:
            As in [`sparse_distillation_loss`].

    Returns:
        [`DistillationLossOutput`]; only `loss` carries gradients.
    """
    _check_sparse_arguments(loss_type, temperature, cache_temperature, jsd_beta, kd_ratio)
    _check_chunk_size(chunk_size)
    if not compute_ce_loss and kd_ratio < 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} < 1 weighs in the cross-entropy; pass compute_ce_loss=True.")
    leading_shape = student_hidden.shape[:-1]
    ids, topk_logprobs, tail_logprob = _flatten_sparse_teacher(
        teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, leading_shape
    )
    valid, valid_labels = _select_valid(labels, leading_shape, "student_hidden", ignore_index)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    if num_valid == 0:
        return _zero_output(student_hidden, student_head, normalizer, compute_ce_loss)

    hidden = _take_rows(student_hidden.reshape(-1, student_hidden.shape[-1]), valid)
    ids = ids.index_select(0, valid).long()
    topk_logprobs = topk_logprobs.index_select(0, valid)
    tail_logprob = tail_logprob.index_select(0, valid)
    resolved: dict[str, int] = {}
    resolved_prior: list[Tensor | None] = []

    def kd_value_and_grad(
        student_logits: Tensor, start: int, end: int, need_grad: bool
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None, int]:
        if not resolved:
            vocab, vocab_t = _resolve_sparse_vocab(
                student_logits.shape[-1], shared_vocab_size, teacher_vocab_size, ids.shape[-1]
            )
            _check_sparse_teacher(ids, topk_logprobs, tail_logprob, vocab)
            resolved.update(vocab=vocab, teacher_vocab_size=vocab_t)
            resolved_prior.append(_resolve_tail_prior(teacher_tail_prior_logprobs, vocab, ids.shape[-1]))
        vocab = resolved["vocab"]
        chunk_ids, chunk_logprobs, chunk_tail = ids[start:end], topk_logprobs[start:end], tail_logprob[start:end]
        student_vocab = student_logits.shape[-1]
        divergence = _sparse_divergence_and_logit_grad(
            student_logits[..., :vocab], chunk_ids, chunk_logprobs, chunk_tail, loss_type, temperature,
            cache_temperature, jsd_beta, scale_by_temperature_squared, resolved["teacher_vocab_size"], need_grad,
            resolved_prior[0],
        )  # fmt: skip
        grad = divergence.logit_grad
        if grad is not None and vocab < student_vocab:
            grad = F.pad(grad, (0, student_vocab - vocab))
        if vocab == student_vocab and divergence.student_log_probs is not None:
            runner.cached_student_log_probs = divergence.student_log_probs
        teacher_argmax, teacher_entropy = _sparse_teacher_statistics(
            chunk_ids, chunk_logprobs, chunk_tail, student_logits.dtype
        )
        return divergence.values, grad, teacher_argmax, teacher_entropy, divergence.student_entropy, vocab

    runner = _ChunkRunner(valid_labels, chunk_size, kd_ratio, compute_ce_loss, kd_value_and_grad)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    return _finish(
        torch.as_tensor(runner.kd_sum, device=total_sum.device, dtype=total_sum.dtype),
        torch.as_tensor(runner.ce_sum, device=total_sum.device, dtype=total_sum.dtype) if compute_ce_loss else None,
        total_sum,
        normalizer,
        num_valid,
        runner.statistics,
    )
