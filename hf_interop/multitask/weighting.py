"""How the losses of several tasks become one objective: pure functions, tensors in and tensors out.

- `static`: `sum_i w_i L_i` with fixed per-task weights `w_i` (the knob `DistillationConfig.kd_ratio` and
  `hidden_loss_weight` also are);
- `uncertainty`: learned log-variances `s_i` (Kendall et al., https://huggingface.co/papers/1705.07115):
  `sum_i exp(-s_i) L_i + s_i`; at the optimum of `s_i`, `exp(s_i) = L_i`, so a noisier task is weighted down;
- `pcgrad`: gradient surgery (Yu et al., https://huggingface.co/papers/2001.06782): where two tasks' gradients
  conflict (negative dot product), each is projected onto the normal plane of the other before they are summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

TASK_WEIGHTING_METHODS = ("static", "uncertainty", "pcgrad")


def check_task_weights(weights: Mapping[str, float] | None, task_names: Sequence[str], argument: str) -> None:
    """Refuse weights of unknown tasks and weights that are negative, NaN or infinite, naming the task and the fix."""
    if weights is None:
        return
    unknown = [name for name in weights if name not in task_names]
    if unknown:
        raise ValueError(
            f"{argument} names task(s) {unknown} that are not among the training tasks {list(task_names)}; fix the "
            "names or add those tasks to train_dataset."
        )
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{argument}[{name!r}]={value!r} is not a number; give a float >= 0.")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{argument}[{name!r}]={value} must be a finite number >= 0 (0 switches the task off).")


def static_weighted_sum(task_losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """`sum_i weights[i] * task_losses[i]`: the combination of `static` weighting.

    Args:
        task_losses (`Sequence[torch.Tensor]`): one 0-d loss per task.
        weights (`Sequence[float]`): one weight per task, >= 0.

    Returns:
        `torch.Tensor`: the 0-d weighted sum (a term whose weight is exactly 0 is left out, so a NaN in a switched-off
        loss does not spread).
    """
    if len(task_losses) != len(weights):
        raise ValueError(f"{len(task_losses)} task losses but {len(weights)} weights; give one weight per loss.")
    if not task_losses:
        raise ValueError("static_weighted_sum needs at least one task loss.")
    total = None
    for loss, weight in zip(task_losses, weights, strict=True):
        if weight == 0:
            continue
        term = loss if weight == 1 else weight * loss
        total = term if total is None else total + term
    return total if total is not None else task_losses[0] * 0.0


def uncertainty_weighted_sum(task_losses: Sequence[Tensor], log_variances: Tensor) -> Tensor:
    """`sum_i exp(-s_i) L_i + s_i` with `s_i = log_variances[i]` (Kendall et al.), the `uncertainty` weighting.

    For a regression task with loss `L_i` = mean squared error, the minimum over `s_i` lies at `exp(s_i) = L_i`, the
    task's noise variance: the learned weight `exp(-s_i)` is the inverse noise variance.

    Args:
        task_losses (`Sequence[torch.Tensor]`): one 0-d loss per task.
        log_variances (`torch.Tensor`): shape `(len(task_losses),)`, learned (an `nn.Parameter` in the optimizer).

    Returns:
        `torch.Tensor`: the 0-d objective.
    """
    if log_variances.ndim != 1 or log_variances.shape[0] != len(task_losses):
        raise ValueError(
            f"log_variances has shape {tuple(log_variances.shape)}; it needs one entry per task loss "
            f"({len(task_losses)})."
        )
    stacked = torch.stack([loss.to(log_variances.dtype) for loss in task_losses])
    return (torch.exp(-log_variances) * stacked + log_variances).sum()


def pcgrad_combine(task_gradients: Sequence[Tensor], order: Sequence[int] | None = None) -> Tensor:
    """PCGrad: the sum of the task gradients after projecting away their pairwise conflicts (Yu et al.).

    For each task `i`, starting from its own gradient `g_i`, every other task `j` (in `order`) with
    `g_i . g_j < 0` is projected out: `g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j`, always against the *original* `g_j`.
    Non-conflicting gradients are left as they are, so without conflicts the result is the plain sum.

    Args:
        task_gradients (`Sequence[torch.Tensor]`): one flattened gradient (same shape) per task.
        order (`Sequence[int]`, *optional*):
            The order in which the other tasks are projected out (the paper shuffles it each step; with two tasks it
            does not matter). Defaults to task order.

    Returns:
        `torch.Tensor`: the combined gradient, same shape as each input.
    """
    if not task_gradients:
        raise ValueError("pcgrad_combine needs at least one task gradient.")
    shapes = {tuple(gradient.shape) for gradient in task_gradients}
    if len(shapes) != 1:
        raise ValueError(f"task gradients have different shapes {sorted(shapes)}; flatten the same parameters.")
    order = list(range(len(task_gradients))) if order is None else list(order)
    squared_norms = [torch.dot(g.flatten(), g.flatten()) for g in task_gradients]
    combined = torch.zeros_like(task_gradients[0])
    for i, gradient in enumerate(task_gradients):
        projected = gradient.clone()
        for j in order:
            if j == i or squared_norms[j] <= 0:
                continue
            other = task_gradients[j]
            dot = torch.dot(projected.flatten(), other.flatten())
            if dot < 0:
                projected = projected - (dot / squared_norms[j]) * other
        combined = combined + projected
    return combined


def effective_weights(method: str, static_weights: Sequence[float], log_variances: Tensor | None) -> list[float]:
    """The weight each task's loss gets, for logs and model cards: `w_i`, or `w_i * exp(-s_i)` (uncertainty)."""
    if method == "uncertainty" and log_variances is not None:
        factors = torch.exp(-log_variances.detach().double()).tolist()
        return [float(w) * f for w, f in zip(static_weights, factors, strict=True)]
    return [float(w) for w in static_weights]
