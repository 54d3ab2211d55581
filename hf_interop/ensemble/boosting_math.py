"""Boosting's pure math: SAMME's member weights and example reweighting, its staged decisions, the sample-weighted
loss, the loss-based reweighting of causal-LM blocks and the additive (product-of-experts) loss.

- SAMME (multi-class AdaBoost, https://hastie.su.domains/Papers/samme.pdf) follows scikit-learn's
  `AdaBoostClassifier` arithmetic line by line (clip to machine epsilon, weighted error, member weight
  `learning_rate * (log((1 - err) / err) + log(K - 1))`, multiplicative update of misclassified examples,
  renormalisation), so member weights agree with scikit-learn's to rounding.
- The additive form trains a new causal LM to minimise the cross-entropy of the log-linear (product-of-experts)
  combination `log_softmax((1 - eta) * F + eta * log_softmax(new_logits))` of the frozen ensemble `F` and the new
  member: it fits what the ensemble so far gets wrong, and the result is exactly an
  :class:`~hf_interop.ensemble.EnsembleForCausalLM` with `combination="product"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def check_sample_weight(sample_weight, num_examples: int | None = None, argument: str = "sample_weight") -> np.ndarray:
    """`sample_weight` as a float64 array, refusing negative, NaN/infinite or all-zero weights (naming the argument)."""
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if num_examples is not None and weights.shape[0] != num_examples:
        raise ValueError(
            f"{argument} has {weights.shape[0]} entries but the dataset has {num_examples} examples; give one "
            "weight per example."
        )
    if weights.size == 0:
        raise ValueError(f"{argument} is empty; the dataset needs at least one example.")
    if not np.all(np.isfinite(weights)):
        bad = np.flatnonzero(~np.isfinite(weights))[:5].tolist()
        raise ValueError(f"{argument} holds NaN or infinite values (rows {bad}); every weight must be a finite >= 0.")
    if np.any(weights < 0):
        bad = np.flatnonzero(weights < 0)[:5].tolist()
        raise ValueError(
            f"{argument} holds negative values (rows {bad}, e.g. {weights[bad[0]]}); weights must be >= 0 "
            "(use 0 to leave an example out)."
        )
    if weights.sum() <= 0:
        raise ValueError(f"{argument} is all zero; give at least one example a positive weight.")
    return weights


@dataclass
class SammeRound:
    """One SAMME round: the next sample weights (normalised), the member's weight and weighted error, and why to stop.

    `stop` is `None` to go on, `"perfect"` when the member made no weighted error (scikit-learn gives it weight 1 and
    stops), or `"chance"` when it is no better than chance (error >= 1 - 1/K; the member is dropped).
    """

    sample_weight: np.ndarray
    estimator_weight: float
    estimator_error: float
    stop: str | None = None


def samme_round(
    sample_weight: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    learning_rate: float = 1.0,
    update_weights: bool = True,
) -> SammeRound:
    """One round of SAMME on a member's `predictions`, as scikit-learn's `AdaBoostClassifier._boost`.

    Args:
        sample_weight (`np.ndarray`): current weights (summing to one; zero weights stay zero).
        predictions, labels (`np.ndarray`): the member's predicted class ids and the true ones, `(num_examples,)`.
        num_classes (`int`): K >= 2.
        learning_rate (`float`, *optional*, defaults to 1.0): shrinks every member weight.
        update_weights (`bool`, *optional*, defaults to `True`): scikit-learn skips the update after the last round.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2 for SAMME.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0.")
    weights = np.asarray(sample_weight, dtype=np.float64).copy()
    epsilon = np.finfo(np.float64).eps
    zero = weights == 0.0
    weights = np.clip(weights, a_min=epsilon, a_max=None)
    weights[zero] = 0.0
    incorrect = np.asarray(predictions) != np.asarray(labels)
    error = float(np.mean(np.average(incorrect, weights=weights, axis=0)))
    if error <= 0:
        return SammeRound(weights, 1.0, 0.0, stop="perfect")
    if error >= 1.0 - 1.0 / num_classes:
        return SammeRound(weights, 0.0, error, stop="chance")
    estimator_weight = learning_rate * (np.log((1.0 - error) / error) + np.log(num_classes - 1.0))
    if update_weights:
        weights = np.exp(
            np.log(weights, where=weights > 0, out=np.full_like(weights, -np.inf))
            + estimator_weight * incorrect * (weights > 0)
        )
        total = weights.sum()
        if not np.isfinite(total) or total <= 0:
            raise ValueError(
                f"sample weights overflowed after a member with weight {estimator_weight:.4g}; lower learning_rate."
            )
        weights = weights / total
    return SammeRound(weights, float(estimator_weight), error)


def samme_staged_decision(
    member_predictions: torch.Tensor | np.ndarray, estimator_weights, num_classes: int
) -> np.ndarray:
    """scikit-learn's `staged_decision_function` for SAMME in the K-column form: `(num_members, num_examples, K)`.

    After member m, class k scores `sum_{j<=m} w_j * (1 if pred_j == k else -1/(K-1)) / sum_{j<=m} w_j`.
    """
    predictions = np.asarray(member_predictions, dtype=np.int64)
    weights = np.asarray(estimator_weights, dtype=np.float64)
    if predictions.ndim != 2 or predictions.shape[0] != weights.shape[0]:
        raise ValueError(
            f"member_predictions has shape {predictions.shape} and estimator_weights {weights.shape}; expected "
            "(num_members, num_examples) and (num_members,)."
        )
    one_hot = predictions[:, :, None] == np.arange(num_classes)[None, None, :]
    votes = np.where(one_hot, weights[:, None, None], -1.0 / (num_classes - 1) * weights[:, None, None])
    return np.cumsum(votes, axis=0) / np.cumsum(weights)[:, None, None]


def samme_staged_predict(member_predictions, estimator_weights, num_classes: int) -> np.ndarray:
    """Class ids after each member, `(num_members, num_examples)` (the lowest class wins a tie, as np.argmax)."""
    return samme_staged_decision(member_predictions, estimator_weights, num_classes).argmax(-1)


def weighted_loss(
    per_item_loss: torch.Tensor, item_weight: torch.Tensor, normaliser: torch.Tensor | float | None = None
) -> torch.Tensor:
    """`sum(item_weight * per_item_loss) / normaliser`, the weighted mean when `normaliser` is the weight sum.

    Items are examples (classification) or target tokens carrying their example's weight (causal LMs).
    `SampleWeightedTrainer` passes the item count of the *whole* optimizer batch (every accumulation step, every
    process) times the training set's mean item weight as `normaliser`, so the gradient does not depend on how that
    batch is split and estimates the weighted objective of the whole training set.
    """
    weights = item_weight.to(per_item_loss.dtype)
    total = (weights * per_item_loss).sum()
    if normaliser is None:
        normaliser = weights.sum()
    return total / normaliser


def loss_reweighting(per_example_loss, temperature: float = 1.0) -> np.ndarray:
    """Weights of the next causal-LM member's blocks from the ensemble's loss on them: `softmax(loss / temperature)`.

    Returned with mean one (so a uniform result is all ones). A higher temperature flattens the weights (infinity:
    uniform); a lower one concentrates the next member on the blocks the ensemble predicts worst.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be > 0 (math.inf gives uniform weights).")
    losses = np.asarray(per_example_loss, dtype=np.float64)
    if not np.all(np.isfinite(losses)):
        raise ValueError("per_example_loss holds NaN or infinite values; the ensemble's loss must be finite.")
    if math.isinf(temperature):
        return np.ones_like(losses)
    scaled = losses / temperature
    scaled -= scaled.max()
    weights = np.exp(scaled)
    return weights / weights.mean()


def additive_log_probs(frozen_log_probs: torch.Tensor, new_logits: torch.Tensor, new_weight: float) -> torch.Tensor:
    """`log_softmax((1 - w) * frozen_log_probs + w * log_softmax(new_logits))`: the product-of-experts combination."""
    import torch

    if not 0.0 < new_weight <= 1.0:
        raise ValueError(f"new_weight={new_weight!r} must lie in (0, 1].")
    new_log_probs = torch.log_softmax(new_logits.float(), dim=-1)
    return torch.log_softmax((1.0 - new_weight) * frozen_log_probs.float() + new_weight * new_log_probs, dim=-1)


def additive_token_losses(
    frozen_log_probs: torch.Tensor, new_logits: torch.Tensor, labels: torch.Tensor, new_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of the additive combination and the mask of real targets (labels != -100).

    Inputs are already aligned: position t of `frozen_log_probs`/`new_logits` predicts `labels[..., t]`.
    """
    combined = additive_log_probs(frozen_log_probs, new_logits, new_weight)
    mask = labels != -100
    target = labels.clamp_min(0).unsqueeze(-1)
    return -combined.gather(-1, target).squeeze(-1) * mask, mask


def additive_weight_nll(
    frozen_log_probs: torch.Tensor, new_log_probs: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Summed NLL of `labels` under `log_softmax((1 - w) F + w G)` for every `w` in `grid`, shape `(len(grid),)`.

    The NLL is convex in `w` (a log-sum-exp of an affine function minus an affine function), so a grid refined
    around its minimum finds the held-out optimum.
    """
    import torch

    mask = labels != -100
    frozen = frozen_log_probs.double()[mask]
    new = new_log_probs.double()[mask]
    target = labels[mask].unsqueeze(-1)
    totals = []
    for weight in grid.tolist():
        combined = torch.log_softmax((1.0 - weight) * frozen + weight * new, dim=-1)
        totals.append(-combined.gather(-1, target).sum())
    return torch.stack(totals)
