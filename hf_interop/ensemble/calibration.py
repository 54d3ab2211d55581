"""Calibration of an ensemble's class probabilities: expected calibration error, and one temperature fitted by
maximum likelihood (temperature scaling, https://arxiv.org/abs/1706.04599) on predictions the members did not train
on, such as the training examples no member of a bagged ensemble drew.

Averaging members' probabilities changes how confident the vote is without changing what it is confident about:
members that disagree make the mean flatter than any of them. One temperature on the vote's log-probabilities
corrects the overall confidence and leaves every prediction's class (the argmax) unchanged.
"""

from __future__ import annotations

import math

import torch

# Inverse temperatures are searched in this range: a temperature of 1000 flattens any vote to uniform, one of 0.001
# makes it one-hot; a fit that runs into either end says the predictions carry no usable confidence.
_INVERSE_TEMPERATURE_RANGE = (1e-3, 1e3)
# Log-probabilities below this are treated as this (a class a vote gives exactly zero probability stays finite).
_LOG_PROB_FLOOR = -1e4


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Sum over `bins` equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share.

    Args:
        confidence (`torch.Tensor`): probability of each prediction's chosen class, in [0, 1].
        correct (`torch.Tensor`): whether each prediction was right (same number of elements).
        bins (`int`, *optional*, defaults to 15): number of bins over (0, 1].
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} must be a positive integer (15 is the usual choice).")
    confidence, correct = confidence.double().flatten(), correct.double().flatten()
    if confidence.numel() != correct.numel():
        raise ValueError(
            f"confidence has {confidence.numel()} values but correct has {correct.numel()}; pass one of each per "
            "prediction."
        )
    if confidence.numel() == 0:
        raise ValueError("expected_calibration_error needs at least one prediction.")
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    total = 0.0
    for index, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        inside = (confidence > low) & (confidence <= high) if index else (confidence >= low) & (confidence <= high)
        if inside.any():
            gap = correct[inside].mean().item() - confidence[inside].mean().item()
            total += abs(gap) * inside.double().mean().item()
    return total


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, expected calibration error, mean confidence and mean log loss of `softmax(logits)` against
    `labels`, in float64.

    Args:
        logits (`torch.Tensor`): `(num_examples, num_labels)` logits or log-probabilities (any shift per row).
        labels (`torch.Tensor`): `(num_examples,)` class ids.
    """
    log_probs = torch.log_softmax(logits.detach().double(), dim=-1)
    labels = labels.to(log_probs.device).long()
    top, predicted = log_probs.max(-1)
    correct = predicted == labels
    confidence = top.exp()
    return {
        "accuracy": correct.double().mean().item(),
        "ece": expected_calibration_error(confidence, correct),
        "confidence": confidence.mean().item(),
        "log_loss": -log_probs.gather(1, labels[:, None]).mean().item(),
    }


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor, max_iterations: int = 100) -> float:
    """The temperature `T` that minimises the mean cross-entropy of `labels` under `softmax(log_probs / T)`.

    The cross-entropy is convex in `1 / T` (a log-sum-exp of linear functions minus a linear one), so a damped
    Newton search on `1 / T` in float64 finds the global minimum; dividing by `T` never changes an argmax.

    Args:
        log_probs (`torch.Tensor`): `(num_examples, num_labels)` log-probabilities (or any logits) of the predictions.
        labels (`torch.Tensor`): `(num_examples,)` class ids.
        max_iterations (`int`, *optional*, defaults to 100): Newton steps at most (a handful usually suffice).

    Returns:
        `T > 0` as a float: above 1 softens overconfident predictions, below 1 sharpens underconfident ones.
    """
    if log_probs.dim() != 2 or labels.dim() != 1 or labels.shape[0] != log_probs.shape[0]:
        raise ValueError(
            f"log_probs has shape {tuple(log_probs.shape)} and labels {tuple(labels.shape)}; pass (num_examples, "
            "num_labels) and (num_examples,)."
        )
    if log_probs.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one example to fit on.")
    scores = log_probs.detach().double().cpu().nan_to_num(nan=_LOG_PROB_FLOOR).clamp_min(_LOG_PROB_FLOOR)
    labels = labels.detach().long().cpu()
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}); they span [{labels.min()}, {labels.max()}].")
    target = scores.gather(1, labels[:, None]).squeeze(1)
    low, high = _INVERSE_TEMPERATURE_RANGE

    def loss(beta: float) -> float:
        return float((torch.logsumexp(beta * scores, dim=1) - beta * target).mean())

    beta, value = 1.0, loss(1.0)
    for _ in range(max_iterations):
        probabilities = torch.softmax(beta * scores, dim=1)
        mean_score = (probabilities * scores).sum(1)
        gradient = float((mean_score - target).mean())
        curvature = float(((probabilities * scores.square()).sum(1) - mean_score.square()).mean())
        if curvature <= 1e-300:
            break  # every prediction uniform: the temperature changes nothing
        step = gradient / curvature
        # Damped: halve the step until the loss does not rise (Newton overshoots where the curvature is uneven).
        for _ in range(60):
            candidate = min(max(beta - step, low), high)
            candidate_value = loss(candidate)
            if candidate_value <= value:
                break
            step /= 2.0
        else:
            break
        converged = abs(candidate - beta) <= 1e-12 * max(1.0, beta)
        beta, value = candidate, candidate_value
        if converged or abs(gradient) < 1e-12:
            break
    if not math.isfinite(beta):
        raise ValueError("fit_temperature did not converge: the log-probabilities hold infinities of both signs.")
    return 1.0 / beta
