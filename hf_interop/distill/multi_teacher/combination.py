"""How several teachers' next-token distributions become the one target a student learns from.

Pure functions on tensors (no trainer, no model):

- `teacher_weights_per_example`: the weight of every teacher on every example, from static weights, from each
  teacher's confidence on the example, or (routing) one-hot on the example's teacher.
- `combine_teacher_log_probs`: the mixture `log sum_k w_k p_k` or the product of experts
  `log prod_k p_k^{w_k} / Z` of the teachers' distributions, with a weight vector per example.

Confidence weights (`teacher_weighting="confidence"`): teacher `k`'s score on example `b` is its mean log-likelihood
of the example's reference text per student target token, `s_bk = log p_k(text_b) / n_b`, and

    w_bk = prior_k * exp(s_bk / tau) / sum_j prior_j * exp(s_bj / tau)

(a softmax over teachers of the scores divided by `confidence_temperature` tau, with the static weights as a prior).
A teacher that predicts the example's text better gets more weight; tau -> inf gives the static weights, tau -> 0
routes each example to its most confident teacher. Scores are per student token, so teachers with different
tokenizers (whose `log p_k(text_b)` are log-probabilities of the same text) are compared on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ...multitask.weighting import check_task_weights

TEACHER_COMBINATIONS = ("route", "mixture", "product")
TEACHER_WEIGHTINGS = ("static", "confidence")


def check_route_weights(weights: Mapping[str, float] | None, teacher_names: Sequence[str]) -> list[float]:
    """Routed rows' loss weights in the order of `teacher_names` (1 for names left out, not normalised).

    Raises `ValueError` naming the value and the fix for unknown names, negative, NaN/infinite or non-numbers.
    """
    names = list(teacher_names)
    if weights is None:
        return [1.0] * len(names)
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"route_weights={weights!r} must be a dict of teacher name -> weight, e.g. {{{names[0]!r}: 0.5}}."
        )
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"route_weights names unknown teacher(s) {unknown}; the routed names are {names}.")
    check_task_weights(weights, names, "route_weights")  # the values: static task weights, each a number >= 0
    return [float(weights.get(name, 1.0)) for name in names]


def check_teacher_weights(weights: Mapping[str, float] | None, teacher_names: Sequence[str]) -> list[float]:
    """Static weights as a list in the order of `teacher_names` (uniform when `None`), normalised to sum to one.

    Raises `ValueError` naming the value and the fix for unknown or missing names, negative, NaN/infinite or
    all-zero weights.
    """
    names = list(teacher_names)
    if weights is None:
        return [1.0 / len(names)] * len(names)
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"teacher_weights={weights!r} must be a dict of teacher name -> weight, e.g. "
            f"{dict.fromkeys(names, round(1.0 / len(names), 3))}."
        )
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"teacher_weights names unknown teacher(s) {unknown}; the teachers are {names}.")
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"teacher_weights has no weight for teacher(s) {missing}; give one weight per teacher.")
    values = []
    for name in names:
        value = weights[name]
        try:
            value = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"teacher_weights[{name!r}]={value!r} is not a number.") from error
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"teacher_weights[{name!r}]={value} must be a finite number >= 0.")
        values.append(value)
    total = sum(values)
    if total <= 0:
        raise ValueError(f"teacher_weights={dict(weights)} are all zero; give at least one teacher a positive weight.")
    return [value / total for value in values]


def teacher_weights_per_example(
    num_examples: int,
    static_weights: Sequence[float],
    *,
    teacher_index: torch.Tensor | None = None,
    confidence_scores: torch.Tensor | None = None,
    confidence_temperature: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Weights of shape `(num_examples, num_teachers)`, each row non-negative and summing to one.

    Args:
        num_examples (`int`): rows of the batch.
        static_weights (`Sequence[float]`): one weight per teacher, normalised (see `check_teacher_weights`).
        teacher_index (`torch.LongTensor` of shape `(num_examples,)`, *optional*): routing; every row is one-hot
            on its teacher. Excludes `confidence_scores`.
        confidence_scores (`torch.Tensor` of shape `(num_examples, num_teachers)`, *optional*): each teacher's
            mean log-likelihood per student token of the example (see the module docstring).
        confidence_temperature (`float`, *optional*, defaults to 1.0): tau of the confidence softmax, > 0.
        device (`torch.device`, *optional*): where the result lives.
    """
    num_teachers = len(static_weights)
    if teacher_index is not None:
        if confidence_scores is not None:
            raise ValueError("pass teacher_index (routing) or confidence_scores (confidence weights), not both.")
        if teacher_index.numel() and (int(teacher_index.min()) < 0 or int(teacher_index.max()) >= num_teachers):
            raise ValueError(
                f"teacher_index holds {teacher_index.unique().tolist()}, outside 0..{num_teachers - 1} "
                f"({num_teachers} teachers)."
            )
        return torch.nn.functional.one_hot(teacher_index.long(), num_teachers).to(torch.float64).to(device)
    prior = torch.tensor(list(static_weights), dtype=torch.float64, device=device)
    if confidence_scores is None:
        return prior.expand(num_examples, num_teachers).clone()
    if not confidence_temperature > 0:
        raise ValueError(f"confidence_temperature={confidence_temperature} must be > 0 (it divides the scores).")
    if tuple(confidence_scores.shape) != (num_examples, num_teachers):
        raise ValueError(
            f"confidence_scores has shape {tuple(confidence_scores.shape)}; expected ({num_examples}, {num_teachers})."
        )
    scores = confidence_scores.to(device=prior.device, dtype=torch.float64) / confidence_temperature
    # log(0) = -inf switches a teacher with static weight 0 off exactly
    return torch.softmax(scores + prior.log(), dim=-1)


def combine_teacher_log_probs(
    teacher_log_probs: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor, rule: str = "mixture"
) -> torch.Tensor:
    """The teachers' distributions combined with a weight vector per example.

    Args:
        teacher_log_probs (`torch.Tensor` of shape `(num_teachers, batch, ..., vocab_size)`): normalised
            log-probabilities of each teacher (a list of `(batch, ..., vocab_size)` tensors works too).
        weights (`torch.Tensor` of shape `(batch, num_teachers)`): non-negative, each row summing to one.
        rule (`str`, *optional*, defaults to `"mixture"`):
            `"mixture"`: `log sum_k w_k p_k` (a token any teacher likes keeps probability);
            `"product"`: `log prod_k p_k^{w_k}` renormalised (a token any weighted teacher rules out stays out;
            teachers with weight 0 are ignored even where their log-probability is `-inf`).

    Returns:
        `torch.Tensor` of shape `(batch, ..., vocab_size)`: normalised log-probabilities, in the dtype of the inputs
        (float32 at least).
    """
    if not isinstance(teacher_log_probs, torch.Tensor):
        teacher_log_probs = torch.stack(list(teacher_log_probs), dim=0)
    if teacher_log_probs.dim() < 3:
        raise ValueError(
            f"teacher_log_probs has shape {tuple(teacher_log_probs.shape)}; expected (num_teachers, batch, ..., "
            "vocab_size)."
        )
    if teacher_log_probs.dtype not in (torch.float32, torch.float64):
        teacher_log_probs = teacher_log_probs.float()
    num_teachers, batch = teacher_log_probs.shape[:2]
    if tuple(weights.shape) != (batch, num_teachers):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}; expected (batch={batch}, teachers={num_teachers})."
        )
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite and >= 0.")
    # (batch, teachers) -> (teachers, batch, 1, ..., 1) to broadcast over positions and the vocabulary
    shaped = (
        weights.to(teacher_log_probs)
        .transpose(0, 1)
        .reshape(num_teachers, batch, *([1] * (teacher_log_probs.dim() - 2)))
    )
    if rule == "mixture":
        return torch.logsumexp(teacher_log_probs + shaped.log(), dim=0)
    if rule == "product":
        weighted = torch.where(shaped > 0, shaped * teacher_log_probs, torch.zeros((), dtype=teacher_log_probs.dtype))
        return torch.log_softmax(weighted.sum(dim=0), dim=-1)
    raise ValueError(f"rule={rule!r} is not a combination of distributions; use 'mixture' or 'product'.")


def sequence_confidence_scores(
    teacher_log_probs: torch.Tensor, shift_labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Each teacher's mean log-likelihood of each example's targets, shape `(batch, num_teachers)`.

    Args:
        teacher_log_probs (`torch.Tensor` of shape `(num_teachers, batch, positions, vocab_size)`): log-probabilities
            at temperature 1, position `i` predicting `shift_labels[:, i]`.
        shift_labels (`torch.LongTensor` of shape `(batch, positions)`): targets, `ignore_index` where none.
    """
    valid = shift_labels != ignore_index
    targets = shift_labels.masked_fill(~valid, 0).to(teacher_log_probs.device)
    index = targets.unsqueeze(0).unsqueeze(-1).expand(teacher_log_probs.shape[0], -1, -1, 1)
    token_log_probs = teacher_log_probs.gather(-1, index).squeeze(-1)  # (teachers, batch, positions)
    token_log_probs = token_log_probs.masked_fill(~valid.to(token_log_probs.device), 0.0)
    counts = valid.sum(-1).clamp(min=1).to(token_log_probs)
    return (token_log_probs.sum(-1) / counts).transpose(0, 1)
