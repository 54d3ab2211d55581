"""The sparse forms: distillation against a cached top-k teacher distribution plus its leftover tail mass.

The cache comes from `hf_interop.teacher_cache`. [`sparse_distillation_loss`] takes full student logits,
[`chunked_sparse_distillation_loss`] the student's final hidden states and output head (the chunk engine of
`chunked.py`). Both compare either k+1 buckets or, with a tail prior, the teacher's tail spread over the
vocabulary like the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .chunked import _check_chunk_size, _ChunkRunner, _KernelRunner, _pad_rows, _run_chunks, _take_rows, _zero_output
from .compiled import KernelChunks, _check_backend, padded_rows, use_compiled
from .dense import DistillationLossOutput, _all_ignored_output, _finish, _Statistics, _with_cross_entropy
from .divergences import (
    _check_cross_entropy_needed,
    _check_labels_in_vocab,
    _check_loss_arguments,
    _ChunkDivergence,
    _compute_dtype,
    _divergence_and_logit_grad,
    _divergence_from_log_probs,
    _normalizer,
    _resolve_vocab,
    _row_dot,
    _select_valid,
    _temperature_factor,
)
from .heads import _head_vocab
from .names import SPARSE_LOSS_TYPES

if TYPE_CHECKING:
    from torch import Tensor

_TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3
# A cached entry at or below this log-prob holds no mass: an entry a compact cache did not keep (adaptive k), a
# served teacher's missing entry (-inf), padding. Same value as `teacher_cache.PAD_LOGPROB` (the losses do not
# import the cache).
_NO_MASS_LOGPROB = -1.0e4


def _kept(topk_logprobs: Tensor) -> Tensor:
    return topk_logprobs > _NO_MASS_LOGPROB


def _like_kept(values: Tensor, kept: Tensor, top_index: Tensor) -> Tensor:
    """`values` with each left-out entry replaced by its row's top entry's: its id is that top id (see
    `_flatten_sparse_teacher`), so a scatter over the ids writes one value per token whatever its order."""
    return torch.where(kept, values, values.gather(-1, top_index))


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
    ids = teacher_topk_ids.reshape(-1, top_k)
    topk_logprobs = teacher_topk_logprobs.detach().reshape(-1, top_k)
    kept = _kept(topk_logprobs)
    if not bool(kept.all()):
        # Entries without mass take their row's top id: a token already in the row, so the student's tail (its mass
        # outside the ids) loses no token to them, and they are masked out of the student's buckets below.
        ids = ids.gather(-1, topk_logprobs.argmax(-1, keepdim=True)).expand_as(ids).where(~kept, ids)
    return ids, topk_logprobs, teacher_tail_logprob.detach().reshape(-1)


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
    kept = _kept(topk_logprobs)
    student_top = student_top.where(kept, torch.finfo(dtype).min)  # entries without teacher mass are no bucket
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
    teacher_top = topk_logprobs.to(dtype)
    teacher_tail = tail_logprob.to(dtype)
    # tokens outside each row's kept entries (entries without mass do not count)
    tail_tokens = teacher_vocab_size - _kept(topk_logprobs).sum(-1).to(dtype)
    # a cache rounds a tiny tail to log(0) = -inf; a floor at float32's smallest normal keeps reverse KL finite
    teacher_tail = torch.where(tail_tokens > 0, teacher_tail.clamp_min(_TAIL_FLOOR), -math.inf)
    if temperature != cache_temperature:
        # Re-tempering: p_T(v) is proportional to p_cache(v) ** (cache_temperature / temperature), exact for the top-k
        # ids. The tail's individual probabilities are unknown; we spread the tail mass uniformly over its
        # `vocab - k` tokens (the maximum-entropy assumption), which gives the tail weight
        # (vocab - k) ** (1 - r) * tail ** r. This is exact for a uniform tail, an upper bound of the true
        # re-tempered tail when temperature > cache_temperature and a lower bound when it is smaller (Jensen).
        ratio = cache_temperature / temperature
        teacher_top = teacher_top * ratio
        teacher_tail = torch.where(
            tail_tokens > 0, teacher_tail * ratio + (1.0 - ratio) * tail_tokens.clamp_min(1).log(), -math.inf
        )
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
    top_buckets = _like_kept(buckets[..., :-1], _kept(topk_logprobs), topk_logprobs.argmax(-1, keepdim=True))
    dense = (log_prior + log_scale).scatter_(-1, ids, top_buckets)
    if temperature != cache_temperature:
        dense = F.log_softmax(dense * (cache_temperature / temperature), dim=-1)
        return (dense, dense.exp()) if with_probs else dense
    if not with_probs:
        return dense
    return dense, probs.mul_(log_scale.exp()).scatter_(-1, ids, top_buckets.exp())


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
    kept = _kept(topk_logprobs)
    # entries without teacher mass are no bucket (their ids repeat a kept id: see `_flatten_sparse_teacher`)
    student_top = log_probs.gather(-1, ids).where(kept, torch.finfo(dtype).min)
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
        id_grad = bucket_grad[..., :-1] - student_top.exp() * total
        grad.scatter_(-1, ids, _like_kept(id_grad, kept, topk_logprobs.argmax(-1, keepdim=True)))
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
    _check_cross_entropy_needed(kd_ratio, compute_ce_loss)
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
        return _all_ignored_output(student_logits, normalizer, compute_ce_loss)

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
    ce_sum, total_sum = _with_cross_entropy(kd_sum, student, valid_labels, kd_ratio, compute_ce_loss)
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
    backend: str = "auto",
) -> DistillationLossOutput:
    """Memory-efficient [`sparse_distillation_loss`] from the student's final hidden states and output head.

    Valid tokens are processed `chunk_size` at a time, as in [`chunked_distillation_loss`]; the cached teacher
    tensors are small (`(..., k)`) and are sliced per chunk. Same values and gradients as the dense sparse form.

    Args:
        student_hidden (`torch.Tensor` of shape `(batch, seq, hidden)` or `(tokens, hidden)`):
            Final hidden states of the student, aligned with `labels`.
        student_head (`Callable`):
            hidden -> logits, usually `output_logits_fn(student)`.
        chunk_size, fused_backward, backend:
            As in [`chunked_distillation_loss`] (Liger has no sparse form: `"liger"` is refused, `"auto"` compiles).
        teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, labels, teacher_tail_prior_logprobs, and
        the other keyword arguments:
            As in [`sparse_distillation_loss`].

    Returns:
        [`DistillationLossOutput`]; only `loss` carries gradients.
    """
    _check_sparse_arguments(loss_type, temperature, cache_temperature, jsd_beta, kd_ratio)
    _check_chunk_size(chunk_size)
    _check_sparse_backend(backend)
    _check_cross_entropy_needed(kd_ratio, compute_ce_loss)
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
    rows = padded_rows(num_valid, chunk_size)
    if use_compiled(backend, rows, shared_vocab_size or _head_vocab(student_head), hidden.device):
        return _compiled_sparse_loss(
            hidden, student_head, ids, topk_logprobs, tail_logprob, valid_labels, rows, normalizer, loss_type,
            temperature, cache_temperature, jsd_beta, scale_by_temperature_squared, kd_ratio, shared_vocab_size,
            teacher_vocab_size, compute_ce_loss, fused_backward, teacher_tail_prior_logprobs, backend,
        )  # fmt: skip
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
        grad = runner.student_logit_grad(divergence, vocab, student_vocab)
        teacher_argmax, teacher_entropy = _sparse_teacher_statistics(
            chunk_ids, chunk_logprobs, chunk_tail, student_logits.dtype
        )
        return divergence.values, grad, teacher_argmax, teacher_entropy, divergence.student_entropy, vocab

    runner = _ChunkRunner(valid_labels, chunk_size, kd_ratio, compute_ce_loss, kd_value_and_grad)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    return runner.output(total_sum, normalizer)


def _check_sparse_backend(backend: str) -> None:
    _check_backend(backend)
    if backend == "liger":
        raise ValueError(
            "backend='liger' has no sparse (cached teacher) form: Liger-Kernel's fused losses need the teacher's "
            "full logits. Use backend='auto' or 'compiled' for the sparse losses."
        )


def _compiled_sparse_loss(
    hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    valid_labels: Tensor,
    rows: int,
    normalizer: int | Tensor,
    loss_type: str,
    temperature: float,
    cache_temperature: float,
    jsd_beta: float,
    scale_by_temperature_squared: bool | None,
    kd_ratio: float,
    shared_vocab_size: int | None,
    teacher_vocab_size: int | None,
    compute_ce_loss: bool,
    fused_backward: bool,
    teacher_tail_prior_logprobs: Tensor | None,
    backend: str,
) -> DistillationLossOutput:
    """[`chunked_sparse_distillation_loss`] through the compiled kernels, every chunk padded to `rows` rows: the
    bucket kernel, or (with a tail prior) the dense kernel on the teacher spread over the vocabulary."""
    num_valid = hidden.shape[0]
    padded = -(-num_valid // rows) * rows
    hidden = F.pad(hidden, (0, 0, 0, padded - num_valid))
    ids, topk_logprobs, tail_logprob = (_pad_rows(tensor, padded) for tensor in (ids, topk_logprobs, tail_logprob))
    factor = _temperature_factor(loss_type, temperature, scale_by_temperature_squared)
    chunks = KernelChunks(
        backend, loss_type, temperature, jsd_beta, 0.0, factor, kd_ratio, compute_ce_loss, num_valid,
        _pad_rows(valid_labels, padded), teacher_normalized=True, teacher_statistics=False,
    )  # fmt: skip
    resolved: dict[str, Any] = {}

    def kernel_chunk(student_logits: Tensor, start: int, end: int) -> tuple:
        if not resolved:
            vocab, vocab_t = _resolve_sparse_vocab(
                student_logits.shape[-1], shared_vocab_size, teacher_vocab_size, ids.shape[-1]
            )
            _check_sparse_teacher(ids[:num_valid], topk_logprobs[:num_valid], tail_logprob[:num_valid], vocab)
            prior = _resolve_tail_prior(teacher_tail_prior_logprobs, vocab, ids.shape[-1])
            resolved.update(vocab=vocab, teacher_vocab_size=vocab_t, prior=prior)
        vocab, prior = resolved["vocab"], resolved["prior"]
        chunk_ids, chunk_logprobs, chunk_tail = ids[start:end], topk_logprobs[start:end], tail_logprob[start:end]
        dtype = student_logits.dtype
        teacher_argmax, teacher_entropy = _sparse_teacher_statistics(chunk_ids, chunk_logprobs, chunk_tail, dtype)
        if prior is not None:
            teacher = _teacher_dense_log_probs(
                chunk_ids, chunk_logprobs, chunk_tail, prior, temperature, cache_temperature, dtype
            )
            grad, kd, ce, student_entropy, _, student_argmax, _, _ = chunks.run(
                student_logits, teacher, start, end, vocab
            )
        else:
            teacher_buckets = _teacher_bucket_log_probs(
                chunk_logprobs, chunk_tail, temperature, cache_temperature, resolved["teacher_vocab_size"], dtype
            )
            top_index = chunk_logprobs.argmax(-1, keepdim=True)
            grad, kd, ce, student_entropy, student_argmax = chunks.run_sparse(
                student_logits, chunk_ids, _kept(chunk_logprobs), top_index, teacher_buckets, start, end, vocab
            )
        return grad, kd, ce, student_entropy, teacher_entropy, student_argmax, teacher_argmax, None

    runner = _KernelRunner(valid_labels, rows, kd_ratio, compute_ce_loss, num_valid, kernel_chunk)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    return runner.output(total_sum, normalizer)
