"""Combination rules of logit-level ensembles: pure functions from member log-probabilities to one distribution.

Every rule takes the members' next-token log-probabilities stacked on a leading member axis, shape
`(num_members, ..., vocab_size)` (or a sequence of same-shaped tensors), and returns normalised log-probabilities of
shape `(..., vocab_size)`: `logsumexp(result, -1) == 0` wherever at least one token stays possible. They compute in
float32 (float64 inputs stay float64), are differentiable in the inputs and in the weights, and never look at a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COMBINATIONS = ("mixture", "product", "max", "contrastive", "arithmetic")
# Rules whose member weights may be negative (signed coefficients); every other rule takes mixing proportions >= 0.
SIGNED_COMBINATIONS = ("arithmetic",)


def _stack(member_log_probs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    if not isinstance(member_log_probs, torch.Tensor):
        tensors = list(member_log_probs)
        if not tensors:
            raise ValueError("member_log_probs is empty; pass one log-probability tensor per member.")
        member_log_probs = torch.stack(tensors, dim=0)
    if member_log_probs.dim() < 2:
        raise ValueError(
            f"member_log_probs has shape {tuple(member_log_probs.shape)}; expected (num_members, ..., vocab_size)."
        )
    if member_log_probs.dtype not in (torch.float32, torch.float64):
        member_log_probs = member_log_probs.float()
    return member_log_probs


def normalise_weights(
    weights: torch.Tensor | Sequence[float] | None, num_members: int, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """Member weights as a 1-D tensor summing to one (uniform when `weights` is `None`).

    Raises `ValueError` for a wrong length, negative, NaN/infinite or all-zero weights, naming the value and the fix.
    Differentiable: a weight tensor that requires grad keeps its graph.
    """
    import torch

    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else None
    if weights is None:
        return torch.full((num_members,), 1.0 / num_members, dtype=dtype, device=device)
    if isinstance(weights, torch.Tensor):
        tensor = weights.to(dtype=dtype, device=device)
    else:
        tensor = torch.tensor([float(weight) for weight in weights], dtype=dtype, device=device)
    check_weights(tensor.detach().cpu().tolist(), num_members)
    return tensor / tensor.sum()


def check_weights(weights: Sequence[float] | None, num_members: int, argument: str = "weights") -> None:
    """Raise a clear `ValueError` unless `weights` is `None` or `num_members` finite, non-negative, not-all-zero numbers."""
    if weights is None:
        return
    try:
        values = [float(weight) for weight in weights]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{argument} must be a list of numbers, one per member; got {weights!r}.") from error
    if len(values) != num_members:
        raise ValueError(
            f"{argument} has {len(values)} entries ({values}) but the ensemble has {num_members} members; "
            f"pass exactly one weight per member, or None for uniform weights."
        )
    bad = [value for value in values if math.isnan(value) or math.isinf(value)]
    if bad:
        raise ValueError(f"{argument} must be finite numbers; got {values}. Replace NaN/inf by a weight >= 0.")
    negative = [value for value in values if value < 0]
    if negative:
        raise ValueError(
            f"{argument} must be >= 0 (they are mixing proportions); got {values}. Use 0 to switch a member off."
        )
    if sum(values) <= 0:
        raise ValueError(f"{argument} are all zero ({values}); give at least one member a positive weight.")


def check_coefficients(coefficients: Sequence[float] | None, num_members: int, argument: str = "weights") -> None:
    """Raise a clear `ValueError` unless `coefficients` are signed weights that define an `"arithmetic"` combination.

    They must be `num_members` finite numbers whose sum is positive: they are divided by that sum, so a sum of zero
    (only differences of members, no base distribution: `[1, -1]`) or a negative sum (all-negative coefficients,
    which would favour the tokens the members find least likely) leaves no distribution to steer.
    """
    if coefficients is None:
        raise ValueError(
            f"combination='arithmetic' needs signed {argument}, one coefficient per member, e.g. [1.0, 1.0, -1.0] "
            "for proxy-tuning (large base + tuned small - small base); got None."
        )
    try:
        values = [float(value) for value in coefficients]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{argument} must be a list of numbers, one per member; got {coefficients!r}.") from error
    if len(values) != num_members:
        raise ValueError(
            f"{argument} has {len(values)} entries ({values}) but the ensemble has {num_members} members; "
            "pass exactly one signed coefficient per member."
        )
    if any(math.isnan(value) or math.isinf(value) for value in values):
        raise ValueError(f"{argument} must be finite numbers; got {values}. Replace NaN/inf by a finite coefficient.")
    total = sum(values)
    if all(value <= 0 for value in values):
        raise ValueError(
            f"{argument}={values} has no positive coefficient: combination='arithmetic' would favour the tokens every "
            "member finds least likely. Give the base model(s) a positive coefficient, e.g. [1.0, 1.0, -1.0]."
        )
    if abs(total) <= 1e-9 * max(abs(value) for value in values):
        raise ValueError(
            f"{argument}={values} sum to zero: the combination is only a difference of members with no base "
            "distribution, and the coefficients cannot be normalised. Add a base member with coefficient 1 "
            "(proxy-tuning: [1.0, 1.0, -1.0]), or use combination='contrastive' for expert-minus-amateur decoding."
        )
    if total < 0:
        raise ValueError(
            f"{argument}={values} sum to {total:g} < 0: normalised by that sum every sign flips and the combination "
            "would favour unlikely tokens. Make the positive coefficients outweigh the negative ones (sum > 0)."
        )


def check_member_weights(
    weights: Sequence[float] | None, num_members: int, combination: str, argument: str = "weights"
) -> None:
    """`check_coefficients` for the signed rules (`"arithmetic"`), `check_weights` for every other rule."""
    if combination in SIGNED_COMBINATIONS:
        check_coefficients(weights, num_members, argument)
    else:
        check_weights(weights, num_members, argument)


def _broadcast(weights: torch.Tensor, member_log_probs: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (member_log_probs.dim() - 1)))


def mixture(
    member_log_probs: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted mean of the members' probabilities: `log(sum_i w_i p_i)`, already normalised.

    Args:
        member_log_probs (`torch.Tensor` of shape `(num_members, ..., vocab_size)`): normalised log-probabilities.
        weights (`torch.Tensor` or `list[float]`, *optional*): non-negative, normalised to sum to one; uniform
            when omitted.

    Returns:
        `torch.Tensor` of shape `(..., vocab_size)`: log-probabilities of the mixture.
    """
    import torch

    log_probs = _stack(member_log_probs)
    weights = normalise_weights(weights, log_probs.shape[0], log_probs)
    # log(0) = -inf switches a member off exactly; logsumexp handles rows that are -inf everywhere.
    return torch.logsumexp(log_probs + _broadcast(weights.log(), log_probs), dim=0)


def product(
    member_log_probs: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Product of experts: the weighted mean of log-probabilities, renormalised (`prod_i p_i^{w_i} / Z`).

    A token some member (with positive weight) rules out stays ruled out. Members with weight 0 are ignored even
    where their log-probability is `-inf` (no `0 * -inf`).

    Args:
        member_log_probs (`torch.Tensor` of shape `(num_members, ..., vocab_size)`): normalised log-probabilities.
        weights (`torch.Tensor` or `list[float]`, *optional*): non-negative, normalised to sum to one; uniform
            when omitted.

    Returns:
        `torch.Tensor` of shape `(..., vocab_size)`: normalised log-probabilities.
    """
    import torch

    log_probs = _stack(member_log_probs)
    weights = normalise_weights(weights, log_probs.shape[0], log_probs)
    weights = _broadcast(weights, log_probs)
    weighted = torch.where(weights > 0, weights * log_probs, torch.zeros((), dtype=log_probs.dtype))
    return torch.log_softmax(weighted.sum(dim=0), dim=-1)


def maximum(
    member_log_probs: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """The `max` rule: each token gets its largest weighted member probability `max_i w_i p_i`, renormalised.

    With uniform weights this is the plain per-token maximum over members (the weights only shift all members
    equally). Members with weight 0 never win.

    Args:
        member_log_probs (`torch.Tensor` of shape `(num_members, ..., vocab_size)`): normalised log-probabilities.
        weights (`torch.Tensor` or `list[float]`, *optional*): non-negative; uniform when omitted.

    Returns:
        `torch.Tensor` of shape `(..., vocab_size)`: normalised log-probabilities.
    """
    import torch

    log_probs = _stack(member_log_probs)
    weights = normalise_weights(weights, log_probs.shape[0], log_probs)
    best = (log_probs + _broadcast(weights.log(), log_probs)).amax(dim=0)
    return torch.log_softmax(best, dim=-1)


def contrastive(
    expert_log_probs: torch.Tensor,
    amateur_log_probs: torch.Tensor,
    alpha: float = 0.1,
    amateur_weight: float = 1.0,
) -> torch.Tensor:
    """Contrastive decoding (https://huggingface.co/papers/2210.15097): expert minus amateur, on plausible tokens.

    Tokens whose expert probability is below `alpha` times the expert's most likely token are removed (the
    plausibility constraint); the rest are scored `log p_expert - amateur_weight * log p_amateur` and renormalised,
    so the returned distribution's argmax is the contrastive-decoding choice and sampling from it is well defined.

    Args:
        expert_log_probs (`torch.Tensor` of shape `(..., vocab_size)`): the stronger model's log-probabilities.
        amateur_log_probs (`torch.Tensor` of shape `(..., vocab_size)`): the weaker model's log-probabilities.
        alpha (`float`, *optional*, defaults to 0.1): plausibility cut-off in (0, 1]; higher keeps fewer tokens.
        amateur_weight (`float`, *optional*, defaults to 1.0): how strongly the amateur is subtracted (>= 0).

    Returns:
        `torch.Tensor` of shape `(..., vocab_size)`: normalised log-probabilities, `-inf` outside the plausible set.
    """
    import torch

    check_contrastive_settings(alpha, amateur_weight)
    expert = _stack([expert_log_probs])[0]
    amateur = _stack([amateur_log_probs])[0].to(expert.dtype)
    if expert.shape != amateur.shape:
        raise ValueError(
            f"expert_log_probs {tuple(expert.shape)} and amateur_log_probs {tuple(amateur.shape)} differ in shape; "
            "both must cover the same positions and vocabulary."
        )
    threshold = expert.amax(dim=-1, keepdim=True) + math.log(alpha)
    plausible = expert >= threshold
    # An amateur's -inf would give +inf; clamp it to the smallest finite value instead.
    safe_amateur = amateur.clamp_min(torch.finfo(amateur.dtype).min / 4)
    scores = torch.where(
        plausible, expert - amateur_weight * safe_amateur, torch.tensor(-math.inf, dtype=expert.dtype)
    )
    return torch.log_softmax(scores, dim=-1)


def check_contrastive_settings(alpha: float, amateur_weight: float) -> None:
    """Raise a clear `ValueError` for an `alpha` outside (0, 1] or a negative `amateur_weight`."""
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(
            f"contrastive_alpha must be in (0, 1] (the plausibility cut-off relative to the expert's top token); "
            f"got {alpha!r}. 0.1 is the value of the contrastive decoding paper."
        )
    if not (isinstance(amateur_weight, (int, float)) and amateur_weight >= 0 and math.isfinite(amateur_weight)):
        raise ValueError(f"contrastive_amateur_weight must be a finite number >= 0; got {amateur_weight!r}.")


def arithmetic(
    member_log_probs: torch.Tensor | Sequence[torch.Tensor], coefficients: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Signed logit arithmetic: `log_softmax(sum_i c_i log p_i)` with coefficients `c` normalised to sum to one.

    Proxy-tuning (https://huggingface.co/papers/2401.08565) is `[1, 1, -1]` over (large base, tuned small, small
    base): the large model shifted by what tuning changed in the small one. DExperts
    (https://huggingface.co/papers/2105.03023) is `[1, alpha, -alpha]` over (base, expert, anti-expert). Since the
    rows of `log p_i` differ from the members' logits by a constant per position, this equals the softmax of the
    same sum of raw logits. Coefficients are divided by their sum (`[2, 2, -2]` is `[1, 1, -1]`); a sum <= 0 or no
    positive coefficient is refused (see :func:`check_coefficients`).

    A token some positive-coefficient member rules out (`-inf`) stays ruled out; a negative-coefficient member's
    `-inf` is clamped to the log of the smallest normal float (about -87 in float32), so no `+inf` or NaN appears.
    Members with coefficient 0 are ignored.

    Args:
        member_log_probs (`torch.Tensor` of shape `(num_members, ..., vocab_size)`): normalised log-probabilities.
        coefficients (`torch.Tensor` or `list[float]`): one signed coefficient per member, summing to more than 0.

    Returns:
        `torch.Tensor` of shape `(..., vocab_size)`: normalised log-probabilities.
    """
    import torch

    log_probs = _stack(member_log_probs)
    if not isinstance(coefficients, torch.Tensor):
        check_coefficients(coefficients, log_probs.shape[0], "coefficients")
        coefficients = [float(value) for value in coefficients]
    tensor = torch.as_tensor(coefficients, dtype=log_probs.dtype, device=log_probs.device)
    check_coefficients(tensor.detach().cpu().tolist(), log_probs.shape[0], "coefficients")
    tensor = _broadcast(tensor / tensor.sum(), log_probs)
    # log of the smallest normal float: a bounded stand-in for log(0), so c * log p never overflows for c < 0
    floor = math.log(torch.finfo(log_probs.dtype).tiny)
    safe = torch.where(tensor < 0, log_probs.clamp_min(floor), log_probs)
    weighted = torch.where(tensor != 0, tensor * safe, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device))
    return torch.log_softmax(weighted.sum(dim=0), dim=-1)


def combine_log_probs(
    member_log_probs: torch.Tensor | Sequence[torch.Tensor],
    combination: str = "mixture",
    weights: torch.Tensor | Sequence[float] | None = None,
    contrastive_alpha: float = 0.1,
    contrastive_amateur_weight: float = 1.0,
) -> torch.Tensor:
    """Apply the rule named `combination` (`"mixture"`, `"product"`, `"max"`, `"contrastive"` or `"arithmetic"`).

    For `"contrastive"` the first member is the expert and the second the amateur (exactly two members). For
    `"arithmetic"` the `weights` are the signed coefficients (required).
    """
    log_probs = _stack(member_log_probs)
    if combination == "mixture":
        return mixture(log_probs, weights)
    if combination == "product":
        return product(log_probs, weights)
    if combination == "max":
        return maximum(log_probs, weights)
    if combination == "arithmetic":
        return arithmetic(log_probs, weights)
    if combination == "contrastive":
        if log_probs.shape[0] != 2:
            raise ValueError(
                f"combination='contrastive' needs exactly 2 members (expert first, amateur second); got "
                f"{log_probs.shape[0]}."
            )
        return contrastive(log_probs[0], log_probs[1], contrastive_alpha, contrastive_amateur_weight)
    raise ValueError(f"combination {combination!r} is not a combination rule; use one of {', '.join(COMBINATIONS)}.")


def causal_lm_nll(
    log_probs: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood of `labels` (shifted: position t predicts label t+1, -100 ignored)."""
    import torch

    shift_log_probs = log_probs[:, :-1, :]
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.nll_loss(
        shift_log_probs.reshape(-1, shift_log_probs.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum().clamp_min(1)
    if isinstance(count, torch.Tensor):
        count = count.to(nll.device)
    return nll / count
