"""Cross-tokenizer distillation losses: pure functions on tensors, over spans aligned by `text_alignment`.

On matched spans the two next-token distributions are compared exactly over the *matched vocabulary* (tokens whose
byte strings exist in both vocabularies, `hf_interop.text_alignment.build_vocabulary_mapping`); on unmatched spans
by the ULD distance (:func:`uld_distance`, Boizard et al., https://huggingface.co/papers/2402.12030), which needs no
shared vocabulary. A multi-token span's distribution is merged as in TRL's GOLD trainer: the distribution at the
span's first position, times the product of the conditional probabilities of the span's later (actual) tokens.
That vector is unnormalised; its entry for the actual first token is the probability of the whole span, and since
the product scales every entry alike it does not change the sorting ULD relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..text_alignment import SpanAlignmentIndex, VocabularyMapping

MATCHED_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
#: `"uld"` compares every span (matched ones too) by the ULD distance, as the original ULD paper does.
SPAN_LOSS_TYPES = (*MATCHED_LOSS_TYPES, "uld")
#: Default weights of the hybrid loss: every aligned span counts once, with its own distance (an exact divergence
#: on matched spans, the ULD distance on unmatched ones). Both are at most a few nats/units per span, so equal
#: weights keep either part from drowning the other; lower `unmatched_weight` to trust the (approximate) ULD less.
DEFAULT_MATCHED_WEIGHT = 1.0
DEFAULT_UNMATCHED_WEIGHT = 1.0


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation distance between probability vectors over different vocabularies.

    The closed form of ULD's Wasserstein-1 distance (https://huggingface.co/papers/2402.12030): sort both vectors
    in descending order, zero-pad the shorter one to the longer's length, and sum the absolute differences. The
    vectors need not be normalised (merged multi-token spans are not).

    Args:
        student_probs (`torch.Tensor` of shape `(..., V_s)`): student probabilities.
        teacher_probs (`torch.Tensor` of shape `(..., V_t)`): teacher probabilities (no gradient needed).
        top_k (`int`, *optional*):
            Compare only the `top_k` largest entries of each side exactly and the remaining mass as one number
            (`|tail_s - tail_t|`, a lower bound of the exact tail term). Faster on large vocabularies; `None`
            (default) is exact.

    Returns:
        `torch.Tensor` of shape `(...,)`.
    """
    student_probs = _upcast(student_probs)
    teacher_probs = _upcast(teacher_probs)
    if top_k is not None and top_k < min(student_probs.size(-1), teacher_probs.size(-1)):
        student_top = student_probs.topk(top_k, dim=-1).values
        teacher_top = teacher_probs.topk(top_k, dim=-1).values
        tail = (student_probs.sum(-1) - student_top.sum(-1)) - (teacher_probs.sum(-1) - teacher_top.sum(-1))
        return (student_top - teacher_top).abs().sum(-1) + tail.abs()
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    shared = min(student_sorted.size(-1), teacher_sorted.size(-1))
    distance = (student_sorted[..., :shared] - teacher_sorted[..., :shared]).abs().sum(-1)
    # Beyond the shorter vocabulary the other side is compared with zero padding: |x - 0| = x (x >= 0).
    return distance + student_sorted[..., shared:].sum(-1) + teacher_sorted[..., shared:].sum(-1)


def uld_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """ULD distance between `softmax(student_logits / T)` and `softmax(teacher_logits / T)`, per row.

    Args:
        student_logits (`torch.Tensor` of shape `(..., V_s)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(..., V_t)`): teacher logits (detached by the caller or not;
            no gradient flows to them here only if they do not require one).
        temperature (`float`, *optional*, defaults to 1.0): softmax temperature T of both models.
        top_k (`int`, *optional*): see :func:`uld_distance`.

    Returns:
        `torch.Tensor` of shape `(...,)`.
    """
    _check_temperature(temperature)
    student_probs = (_upcast(student_logits) / temperature).softmax(-1)
    teacher_probs = (_upcast(teacher_logits) / temperature).softmax(-1)
    return uld_distance(student_probs, teacher_probs, top_k=top_k)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for the math (bfloat16/float16 inputs are upcast); float64 stays float64 (reference tests)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 1.0 leaves the distributions unchanged.")


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0 and no NaN gradients where p is 0."""
    p = log_p.exp()
    support = p > 0
    log_p = torch.where(support, log_p, torch.zeros_like(log_p))
    log_q = torch.where(support, log_q, torch.zeros_like(log_q))
    return (p * (log_p - log_q)).sum(-1)


def _matched_bucket_log_probs(
    log_probs: torch.Tensor, matched_ids: torch.Tensor, unmatched_mask: torch.Tensor, with_rest: bool
) -> torch.Tensor:
    matched = log_probs.index_select(-1, matched_ids)
    if not with_rest:  # renormalise over the matched vocabulary
        return matched - matched.logsumexp(-1, keepdim=True)
    rest = log_probs.masked_fill(~unmatched_mask, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([matched, rest], dim=-1)


def matched_vocabulary_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: VocabularyMapping,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool | None = None,
) -> torch.Tensor:
    """Exact divergence between two next-token distributions over the matched vocabulary, per row.

    Each distribution (at temperature T) is reduced to the matched vocabulary (`mapping`, in the same order on
    both sides) plus one *rest* bucket holding its probability of every unmatched token, and the divergence is
    taken between these two distributions. A mapping built with `unmatched="prefix"` instead moves every teacher
    token's probability onto the student token of its longest prefix (`mapping.teacher_to_student`) and compares
    that with the student's whole distribution (forward KL and JSD; reverse KL is refused: infinite wherever the
    student puts mass the projected teacher has none on). When one side has no unmatched column (its vocabulary lies inside the
    other's), the rest bucket is dropped and both sides are renormalised over the matched vocabulary. With two
    identical tokenizers every token is matched and this is exactly the same-tokenizer divergence.

    Args:
        student_logits (`torch.Tensor` of shape `(N, V_s)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(N, V_t)`): teacher logits.
        mapping (`VocabularyMapping`): from :func:`build_vocabulary_mapping`.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(teacher || student), `"reverse_kl"` = KL(student || teacher), `"jsd"` = generalized
            Jensen-Shannon with `jsd_beta` (0 is exactly forward KL, 1 exactly reverse KL).
        temperature (`float`, *optional*, defaults to 1.0): divides both models' logits.
        jsd_beta (`float`, *optional*, defaults to 0.5): interpolation of `"jsd"`.
        scale_by_temperature_squared (`bool`, *optional*):
            Multiply by T^2 (Hinton et al.) so gradients keep their scale; defaults to `True` for `"forward_kl"`
            and `False` otherwise.

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    if loss_type not in MATCHED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported on matched tokens; use one of {MATCHED_LOSS_TYPES}."
        )
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}.")
    _check_temperature(temperature)
    if student_logits.size(-1) != mapping.student_vocab_size or teacher_logits.size(-1) != mapping.teacher_vocab_size:
        raise ValueError(
            f"logits widths (student {student_logits.size(-1)}, teacher {teacher_logits.size(-1)}) do not match the "
            f"vocabulary mapping (student {mapping.student_vocab_size}, teacher {mapping.teacher_vocab_size}); build "
            "it with build_vocabulary_mapping(..., student_vocab_size=..., teacher_vocab_size=...) from the models' "
            "config.vocab_size."
        )
    if mapping.num_matched == 0:
        raise ValueError("the two vocabularies share no token string, so no position can be matched; use ULD only.")
    device = student_logits.device
    student_log_probs = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    if mapping.teacher_to_student is not None:  # the teacher's whole distribution moved onto the student's tokens
        if loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1.0):
            raise ValueError(
                "reverse KL is infinite wherever the student puts mass on a token the projected teacher gives none; "
                "use forward_kl or jsd (beta < 1) with unmatched='prefix', or unmatched='bucket'."
            )
        teacher_ids, student_ids = mapping.projection(device)
        teacher_probs = torch.softmax(_upcast(teacher_logits) / temperature, dim=-1)
        if teacher_ids is not None:
            teacher_probs = teacher_probs.index_select(-1, teacher_ids)
        moved = torch.zeros_like(student_log_probs).index_add_(-1, student_ids, teacher_probs)
        # what a teacher token without a student prefix held (an unpaired special token) is left out
        log_t = (moved / moved.sum(-1, keepdim=True)).log()
        log_s = student_log_probs
    else:
        student_unmatched, teacher_unmatched = mapping.unmatched_masks(device)
        with_rest = bool(student_unmatched.any()) and bool(teacher_unmatched.any())
        teacher_log_probs = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
        log_s = _matched_bucket_log_probs(
            student_log_probs, mapping.student_ids.to(device), student_unmatched, with_rest
        )
        log_t = _matched_bucket_log_probs(
            teacher_log_probs, mapping.teacher_ids.to(device), teacher_unmatched, with_rest
        )
    if loss_type == "forward_kl" or (loss_type == "jsd" and jsd_beta == 0.0):
        divergence = _kl_from_log_probs(log_t, log_s)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1.0):
        divergence = _kl_from_log_probs(log_s, log_t)
    else:
        log_mixture = torch.logaddexp(log_t + math.log(jsd_beta), log_s + math.log(1.0 - jsd_beta))
        divergence = jsd_beta * _kl_from_log_probs(log_t, log_mixture) + (1.0 - jsd_beta) * _kl_from_log_probs(
            log_s, log_mixture
        )
    if scale_by_temperature_squared is None:
        scale_by_temperature_squared = loss_type == "forward_kl"
    if scale_by_temperature_squared:
        divergence = divergence * temperature**2
    return divergence


@dataclass
class CrossTokenizerLossOutput:
    """Result of :func:`span_aligned_distillation_loss`.

    Attributes:
        loss (`torch.Tensor`): `(matched_weight * sum(matched) + unmatched_weight * sum(unmatched)) / normalizer`.
        matched_loss (`torch.Tensor`): mean divergence over matched spans (detached; 0 when there are none).
        unmatched_loss (`torch.Tensor`): mean ULD distance over unmatched spans (detached; 0 when there are none).
        num_matched (`int`): matched spans in the batch.
        num_unmatched (`int`): unmatched spans in the batch.
    """

    loss: torch.Tensor
    matched_loss: torch.Tensor
    unmatched_loss: torch.Tensor
    num_matched: int
    num_unmatched: int

    @property
    def matched_fraction(self) -> float:
        total = self.num_matched + self.num_unmatched
        return self.num_matched / total if total else 0.0


def _merged_span_probs(
    flat_logits: torch.Tensor,
    base_rows: torch.Tensor,
    continuation_rows: torch.Tensor,
    continuation_tokens: torch.Tensor,
    continuation_spans: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Base distribution of each span times the product of its later tokens' conditional probabilities."""
    base = (_upcast(flat_logits[base_rows]) / temperature).softmax(-1)
    if continuation_rows.numel() == 0:
        return base
    rows = _upcast(flat_logits[continuation_rows]) / temperature
    token_log_probs = rows.gather(-1, continuation_tokens[:, None]).squeeze(-1) - rows.logsumexp(-1)
    log_scale = torch.zeros(base.size(0), dtype=base.dtype, device=base.device)
    log_scale = log_scale.index_add(0, continuation_spans, token_log_probs)
    return base * log_scale.exp()[:, None]


def span_aligned_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    index: SpanAlignmentIndex,
    mapping: VocabularyMapping | None,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool | None = None,
    matched_weight: float = DEFAULT_MATCHED_WEIGHT,
    unmatched_weight: float = DEFAULT_UNMATCHED_WEIGHT,
    uld_top_k: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    example_weights: torch.Tensor | None = None,
) -> CrossTokenizerLossOutput:
    """Hybrid cross-tokenizer distillation loss on aligned spans.

    Matched spans: :func:`matched_vocabulary_divergence` (`loss_type`) between the two rows predicting the span's
    token (with `loss_type="uld"`: the ULD distance there too). Unmatched spans: :func:`uld_distance` between the merged span distributions (see the module docstring).
    Loss `= (matched_weight * sum over matched spans + unmatched_weight * sum over unmatched spans) / normalizer`,
    where the normalizer is `num_items_in_batch` (spans in the whole accumulated batch) if given, else the
    number of spans here.

    Args:
        student_logits (`torch.Tensor` of shape `(B, S, V_s)`): student logits over its input.
        teacher_logits (`torch.Tensor` of shape `(B, T, V_t)`): teacher logits (no gradient).
        index (`SpanAlignmentIndex`): from :func:`build_span_alignment_index` (the collator builds it).
        mapping (`VocabularyMapping`, *optional*): needed when there are matched spans.
        loss_type, temperature, jsd_beta, scale_by_temperature_squared: see :func:`matched_vocabulary_divergence`.
        matched_weight (`float`, *optional*, defaults to 1.0): weight of the matched part.
        unmatched_weight (`float`, *optional*, defaults to 1.0): weight of the ULD part.
        uld_top_k (`int`, *optional*): see :func:`uld_distance` (`None`: exact).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): global normalizer.
        example_weights (`torch.Tensor` of shape `(B,)`, *optional*): multiplies every span of row `b` by
            `example_weights[b]` (several teachers weighted per example; 0 leaves the row out). `None`: all 1.
    """
    _check_temperature(temperature)
    if loss_type not in SPAN_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported here; use one of {SPAN_LOSS_TYPES}.")
    for name, value in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    student_flat = student_logits.reshape(-1, student_logits.size(-1))
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.size(-1))
    device = student_flat.device
    index = SpanAlignmentIndex(**{name: getattr(index, name).to(device) for name in SpanAlignmentIndex.FIELDS})
    zero = student_flat.sum() * 0.0  # keeps the graph connected (and the loss finite) when a part is empty
    matched_sum = unmatched_sum = zero
    student_length = student_logits.shape[1] if student_logits.dim() == 3 else 1

    def weighted_sum(values: torch.Tensor, student_rows: torch.Tensor) -> torch.Tensor:
        if example_weights is None:
            return values.sum()
        return (values * example_weights.to(values)[student_rows // student_length]).sum()

    if index.num_matched and loss_type == "uld":  # plain ULD: matched spans are compared by ULD too
        matched_sum = weighted_sum(
            uld_loss(
                student_flat[index.matched_student_rows],
                teacher_flat[index.matched_teacher_rows],
                temperature=temperature,
                top_k=uld_top_k,
            ),
            index.matched_student_rows,
        )
    elif index.num_matched:
        if mapping is None:
            raise ValueError("the batch has matched spans but mapping is None; pass build_vocabulary_mapping(...).")
        matched_sum = weighted_sum(
            matched_vocabulary_divergence(
                student_flat[index.matched_student_rows],
                teacher_flat[index.matched_teacher_rows],
                mapping,
                loss_type=loss_type,
                temperature=temperature,
                jsd_beta=jsd_beta,
                scale_by_temperature_squared=scale_by_temperature_squared,
            ),
            index.matched_student_rows,
        )
    if index.num_unmatched:
        student_merged = _merged_span_probs(
            student_flat,
            index.unmatched_student_rows,
            index.student_continuation_rows,
            index.student_continuation_tokens,
            index.student_continuation_spans,
            temperature,
        )
        with torch.no_grad():
            teacher_merged = _merged_span_probs(
                teacher_flat,
                index.unmatched_teacher_rows,
                index.teacher_continuation_rows,
                index.teacher_continuation_tokens,
                index.teacher_continuation_spans,
                temperature,
            )
        unmatched_sum = weighted_sum(
            uld_distance(student_merged, teacher_merged, top_k=uld_top_k), index.unmatched_student_rows
        )
    num_spans = index.num_matched + index.num_unmatched
    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_spans, 1)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device)
    loss = (matched_weight * matched_sum + unmatched_weight * unmatched_sum) / normalizer
    return CrossTokenizerLossOutput(
        loss=loss,
        matched_loss=matched_sum.detach() / max(index.num_matched, 1),
        unmatched_loss=unmatched_sum.detach() / max(index.num_unmatched, 1),
        num_matched=index.num_matched,
        num_unmatched=index.num_unmatched,
    )


@dataclass
class CrossTokenizerDistillationOutput:
    """Result of :func:`cross_tokenizer_distillation_loss`.

    Attributes:
        loss (`torch.Tensor`): `kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss` (what the trainer backpropagates).
        kd_loss (`torch.Tensor`): weighted sum over aligned spans of the hybrid loss / normaliser.
        ce_loss (`torch.Tensor`): the student's cross-entropy on its own labels / normaliser.
        spans (`CrossTokenizerLossOutput`): the matched / unmatched breakdown.
        num_valid_tokens (`int`): student target tokens in this batch.
    """

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    spans: CrossTokenizerLossOutput
    num_valid_tokens: int


def cross_tokenizer_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    index: SpanAlignmentIndex,
    mapping: VocabularyMapping | None,
    *,
    kd_ratio: float = 0.5,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    **span_loss_kwargs: Any,
) -> CrossTokenizerDistillationOutput:
    """Cross-entropy of the student on its own labels plus the span-aligned distillation loss.

    Both sums are divided by the same normaliser: `num_items_in_batch` (the student's valid target tokens over the
    whole accumulated batch, which `transformers.Trainer` counts) or, without it, this batch's valid target
    tokens. Normalising the span sum by tokens (not spans) keeps the result independent of how a batch is split
    into accumulation steps or processes; each span covers at least one student token, so the scale is at most
    the per-span mean.

    Args:
        student_logits (`torch.Tensor` of shape `(B, S, V_s)`): student logits over its full input.
        teacher_logits (`torch.Tensor` of shape `(B, T, V_t)`): teacher logits over its full input (no gradient).
        labels (`torch.LongTensor` of shape `(B, S)`): the student's labels, NOT shifted (position i predicts
            `labels[:, i + 1]`), -100 where ignored.
        index, mapping: see :func:`span_aligned_distillation_loss`.
        kd_ratio (`float`, *optional*, defaults to 0.5): weight of distillation against cross-entropy, in [0, 1].
        ignore_index (`int`, *optional*, defaults to -100): label value left out.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): global normaliser.
        **span_loss_kwargs: `loss_type`, `temperature`, `jsd_beta`, `matched_weight`, `unmatched_weight`,
            `uld_top_k`, `scale_by_temperature_squared` of :func:`span_aligned_distillation_loss`.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} is outside [0, 1]; 1.0 is pure distillation, 0.0 plain training.")
    shift_logits = student_logits[:, :-1]
    shift_labels = labels[:, 1:].to(shift_logits.device)
    num_valid_tokens = int((shift_labels != ignore_index).sum())
    normalizer = num_items_in_batch if num_items_in_batch is not None else max(num_valid_tokens, 1)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(shift_logits.device)
    ce_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    ce_loss = ce_sum / normalizer
    spans = span_aligned_distillation_loss(
        student_logits, teacher_logits, index, mapping, num_items_in_batch=normalizer, **span_loss_kwargs
    )
    loss = kd_ratio * spans.loss + (1.0 - kd_ratio) * ce_loss
    return CrossTokenizerDistillationOutput(loss, spans.loss, ce_loss, spans, num_valid_tokens)
