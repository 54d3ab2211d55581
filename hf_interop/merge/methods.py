"""The merge methods as pure functions over tensors: each takes the tensors of one parameter and returns the merge.

Methods (the names mergekit uses):

- `linear`: weighted average, a model soup (https://huggingface.co/papers/2203.05482).
- `task_arithmetic`: base + sum_i w_i (theta_i - base) (https://huggingface.co/papers/2212.04089).
- `ties`: trim each task vector to its largest-magnitude `density` fraction, elect a sign per parameter, average
  the task vectors that agree with it (https://huggingface.co/papers/2306.01708).
- `dare_linear` / `dare_ties`: drop task-vector entries at random (keep probability `density`, seeded), rescale
  by 1/density, then combine as task arithmetic / TIES (https://huggingface.co/papers/2311.03099).
- `slerp`: spherical interpolation of two models, tensor by tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
METHODS_NEEDING_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
METHODS_USING_DENSITY = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5


# ----------------------------------------------------------------------------------------------------------------
# The math: pure functions over tensors
# ----------------------------------------------------------------------------------------------------------------


def trim_threshold(delta: torch.Tensor, density: float, magnitudes_given: bool = False) -> torch.Tensor:
    """Magnitude of the `ceil(density * numel)`-th largest entry of `delta` (TIES keeps entries at or above it).

    With `magnitudes_given=True`, `delta` already holds absolute values (saves a copy of a large tensor).
    """

    keep = max(1, math.ceil(density * delta.numel()))
    magnitudes = (delta if magnitudes_given else delta.abs()).reshape(-1)
    return _kth_largest(magnitudes, keep)


def _kth_largest(values: torch.Tensor, k: int, sample_size: int = 2**16, margin: float = 0.01) -> torch.Tensor:
    """Exact k-th largest entry of a 1-D tensor without sorting (or copying) all of it.

    A seeded random sample brackets the answer between two values; two counting passes confirm the bracket, and
    only the entries inside it (about `2 * margin` of the tensor) go through `kthvalue`. If the bracket misses
    (very unlikely), the whole tensor goes through `kthvalue`.
    """
    count = values.numel()
    if count <= 4 * sample_size:
        return torch.kthvalue(values, count - k + 1).values
    generator = torch.Generator().manual_seed(0)
    sample = values[torch.randint(0, count, (sample_size,), generator=generator)].sort().values
    below = (count - k) / count  # fraction of entries below the answer
    low_index = math.floor((below - margin) * sample_size)
    high_index = math.ceil((below + margin) * sample_size)
    low = sample[low_index] if low_index >= 0 else values.new_tensor(-math.inf)
    high = sample[high_index] if high_index < sample_size else values.new_tensor(math.inf)
    num_above_high = int((values > high).sum())
    if int((values >= low).sum()) >= k > num_above_high:
        inside = values[(values >= low) & (values <= high)]
        rank = k - num_above_high  # the answer's rank from the top among the entries inside the bracket
        return torch.kthvalue(inside, inside.numel() - rank + 1).values
    return torch.kthvalue(values, count - k + 1).values


def magnitude_trim(delta: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the `ceil(density * numel)` entries of largest magnitude, zero the rest (TIES' trim step).

    Entries tied with the smallest kept magnitude are all kept. `threshold` (from :func:`trim_threshold` on the
    whole tensor) lets a slice of a tensor be trimmed exactly as the whole tensor would be.
    """
    if density >= 1.0:
        return delta
    if threshold is None:
        threshold = trim_threshold(delta, density)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def dare_keep_mask(
    shape: Sequence[int], density: float, seed: int, tensor_name: str, model_index: int
) -> torch.Tensor:
    """Bernoulli(density) keep mask of DARE, seeded by `(seed, tensor_name, model_index)`.

    The seed depends on the tensor's name, not on the order tensors are processed in, so a streamed merge and an
    in-memory merge drop exactly the same entries.
    """
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{model_index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(tuple(shape), generator=generator) < density


def _disjoint_merge(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: average, per entry, the weighted deltas that agree with the sign of
    their weighted sum; entries where no delta agrees become 0."""
    numerator = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        numerator += weight * delta
    elected_sign = torch.sign(numerator)
    numerator.zero_()
    denominator = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        agrees = (torch.sign(delta) == elected_sign) & (elected_sign != 0)
        numerator += torch.where(agrees, weight * delta, 0.0)
        denominator += agrees * weight
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)


def slerp_coefficients(
    t: float, dot: float, first_norm: float, second_norm: float, dot_threshold: float = 0.9995
) -> tuple[float, float]:
    """`(c0, c1)` with slerp(t, a, b) = c0 * a + c1 * b, from the dot product and norms of a and b.

    Linear interpolation `(1 - t, t)` when either vector is zero or they are (anti)parallel (|cos| > threshold).
    """
    if first_norm == 0 or second_norm == 0:
        return 1 - t, t
    cosine = max(-1.0, min(1.0, dot / (first_norm * second_norm)))
    if abs(cosine) > dot_threshold:
        return 1 - t, t
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    return math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp(t: float, first: torch.Tensor, second: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors; linear when they are (anti)parallel."""
    first_flat, second_flat = first.double().flatten(), second.double().flatten()
    c0, c1 = slerp_coefficients(
        t, float(first_flat @ second_flat), float(first_flat.norm()), float(second_flat.norm()), dot_threshold
    )
    return c0 * first + c1 * second


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    density: float = DEFAULT_DENSITY,
    slerp_t: float = 0.5,
    dare_masks: Sequence[torch.Tensor] | None = None,
    trim_thresholds: Sequence[torch.Tensor] | None = None,
    slerp_weights: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Merge one tensor (or one slice of it) across checkpoints, in the dtype of `tensors`.

    Args:
        method (`str`): one of `MERGE_METHODS`.
        tensors (`list[torch.Tensor]`): the tensor from each checkpoint (same shape).
        weights (`list[float]`): one per tensor. `linear` normalises them to sum to 1; `task_arithmetic` and
            `dare_linear` scale each task vector by its weight; `ties`/`dare_ties` use them in the sign election
            and the disjoint weighted mean.
        base (`torch.Tensor`, *optional*): the base model's tensor (task-vector methods).
        density (`float`, *optional*, defaults to 0.5): kept fraction (`ties`) or keep probability (`dare_*`).
        slerp_t (`float`, *optional*, defaults to 0.5): interpolation point of `slerp` (0 gives the first tensor).
        dare_masks (`list[torch.Tensor]`, *optional*): keep masks of `dare_*`, one per tensor.
        trim_thresholds (`list[torch.Tensor]`, *optional*): per-tensor TIES thresholds computed on whole tensors
            (:func:`trim_threshold`), when `tensors` are slices.
        slerp_weights (`tuple[float, float]`, *optional*): :func:`slerp_coefficients` of whole tensors, when
            `tensors` are slices.
    """
    if method == "linear":
        total = sum(weights)
        merged = (weights[0] / total) * tensors[0]
        for weight, tensor in zip(weights[1:], tensors[1:], strict=True):
            merged += (weight / total) * tensor
        return merged
    if method == "slerp":
        if slerp_weights is None:
            return slerp(slerp_t, tensors[0], tensors[1])
        return slerp_weights[0] * tensors[0] + slerp_weights[1] * tensors[1]
    if base is None:
        raise ValueError(f"merge method {method!r} needs the base model's tensor.")
    deltas = [tensor - base for tensor in tensors]
    if method in ("dare_linear", "dare_ties"):
        if dare_masks is None:
            raise ValueError(f"merge method {method!r} needs dare_masks (see dare_keep_mask).")
        deltas = [delta * mask / density for delta, mask in zip(deltas, dare_masks, strict=True)]
    if method in ("task_arithmetic", "dare_linear"):
        merged = base.clone()
        for weight, delta in zip(weights, deltas, strict=True):
            merged += weight * delta
        return merged
    if method == "ties":
        thresholds = trim_thresholds or [None] * len(deltas)
        deltas = [
            magnitude_trim(delta, density, threshold) for delta, threshold in zip(deltas, thresholds, strict=True)
        ]
    if method in ("ties", "dare_ties"):
        return base + _disjoint_merge(deltas, list(weights))
    raise ValueError(f"method {method!r} is not one of {list(MERGE_METHODS)}.")
