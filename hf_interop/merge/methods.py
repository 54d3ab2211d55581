"""The merge methods as pure functions over tensors: each takes the tensors of one parameter and returns the merge.

Methods (the names mergekit uses):

- `linear`: weighted average, a model soup (https://huggingface.co/papers/2203.05482).
- `task_arithmetic`: base + sum_i w_i (theta_i - base) (https://huggingface.co/papers/2212.04089).
- `ties`: trim each task vector to its largest-magnitude `density` fraction, elect a sign per parameter, average
  the task vectors that agree with it (https://huggingface.co/papers/2306.01708).
- `dare_linear` / `dare_ties`: drop task-vector entries at random (keep probability `density`, seeded), rescale
  by 1/density, then combine as task arithmetic / TIES (https://huggingface.co/papers/2311.03099).
- `slerp`: spherical interpolation of two models, tensor by tensor.
- `breadcrumbs`: task arithmetic over task vectors with both tails cut: the `gamma` share of largest-magnitude
  entries (outliers) and the smallest ones, keeping a `density` share (https://huggingface.co/papers/2312.06795).
- `della` / `della_linear`: MagPrune drops task-vector entries at random with a keep probability that grows with
  the entry's magnitude rank in its row (`density` +- `epsilon`), rescales kept entries by 1 / their keep
  probability, then combines as TIES (sign election, disjoint mean) / task arithmetic
  (https://huggingface.co/papers/2406.11617).
- `model_stock`: interpolates between the base and the average of the fine-tunes by a ratio computed from the
  angle between their task vectors, per tensor (https://huggingface.co/papers/2403.19522).

Agreement with mergekit 0.1.5 (tests/merge/test_mergekit_agreement.py): linear, task_arithmetic, ties,
breadcrumbs, model_stock and slerp give the same tensors within 1e-6. Differences by design:

- DARE and DELLA rescale kept entries by 1 / their keep probability, as both papers do, which keeps each task
  vector unbiased; mergekit's default rescales the masked task vector to its original L1 norm. With the same masks,
  our dare_* equals mergekit's with `rescale=False, lambda=1/density` (and `normalize=True` for dare_ties); della
  has mergekit's keep probabilities and sign election.
- dare_ties averages the entries that agree with the elected sign (TIES' disjoint mean, as DARE's paper applies
  DARE before TIES); mergekit's dare_ties sums them by default (`normalize=False`).
- Trimming (ties, breadcrumbs) keeps `ceil(density * n)` entries (at least the share asked for) and ties in
  magnitude together; mergekit keeps `int(density * n)`. They agree whenever `density * n` is a whole number.
- Random drops are seeded per tensor name and model (same result streamed or in memory, any order); mergekit
  draws from torch's global generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

MERGE_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "breadcrumbs",
    "della",
    "della_linear",
    "model_stock",
)
METHODS_NEEDING_BASE = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "della",
    "della_linear",
    "model_stock",
)
METHODS_USING_DENSITY = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear")
# Methods that elect a sign per entry (their weights must be positive).
METHODS_ELECTING_SIGNS = ("ties", "dare_ties", "della")
DEFAULT_DENSITY = 0.5
DEFAULT_GAMMA = 0.01  # breadcrumbs: share of largest-magnitude task-vector entries removed as outliers
DEFAULT_EPSILON = 0.15  # della: keep probabilities span density - epsilon .. density + epsilon


# ----------------------------------------------------------------------------------------------------------------
# The math: pure functions over tensors
# ----------------------------------------------------------------------------------------------------------------


def trim_threshold(delta: torch.Tensor, density: float, magnitudes_given: bool = False) -> torch.Tensor:
    """Magnitude of the `ceil(density * numel)`-th largest entry of `delta` (TIES keeps entries at or above it).

    With `magnitudes_given=True`, `delta` already holds absolute values. Either way no full-size copy is made: the
    magnitudes are taken block by block (:class:`KthLargest`).
    """
    selector = KthLargest([_trim_rank(delta.numel(), density)], delta.numel(), delta.dtype)
    return _select_in_memory(selector, delta, magnitudes_given)[0]


def _trim_rank(count: int, density: float) -> int:
    return max(1, math.ceil(density * count))


def _select_in_memory(selector: KthLargest, values: torch.Tensor, magnitudes_given: bool) -> list[torch.Tensor]:
    flat = values.reshape(-1)
    while not selector.done:
        for start in range(0, flat.numel(), KthLargest.BLOCK_ELEMENTS):
            block = flat[start : start + KthLargest.BLOCK_ELEMENTS]
            selector.update(block if magnitudes_given else block.abs())
        selector.finish_pass()
    return selector.values()


class KthLargest:
    """Exact k-th largest entries (several `ranks` at once) of a float tensor fed block by block, never whole.

    Radix selection: floats are mapped to integers of the same width that sort like them, and each pass over the
    blocks fixes 16 more bits of each answer from a 65536-bin histogram of the entries that share the bits fixed
    so far (2 passes for float32, 4 for float64, 1 for 16-bit floats). The answer is the same entry
    `torch.kthvalue` picks, bit for bit, while memory is a few blocks: this is what lets a streamed TIES or
    breadcrumbs merge find whole-tensor thresholds without holding a whole task vector.

    Use: `while not selector.done: (selector.update(block) for every block); selector.finish_pass()`, then
    `selector.values()` (one 0-dim tensor per rank, in the order given).
    """

    DIGIT_BITS = 16
    BLOCK_ELEMENTS = 2**20  # the in-memory helpers feed a large tensor in slices of this many entries

    def __init__(self, ranks: Sequence[int], count: int, dtype: torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"KthLargest selects among floats, got dtype {dtype}; pass a floating-point tensor.")
        bad = [rank for rank in ranks if not 1 <= rank <= count]
        if bad:
            raise ValueError(f"ranks {bad} are outside 1..{count} (the number of entries); pass ranks within it.")
        self.dtype = dtype
        self.bits = torch.finfo(dtype).bits
        self._integer_dtype = {16: torch.int16, 32: torch.int32, 64: torch.int64}[self.bits]
        self._magnitude_mask = 2 ** (self.bits - 1) - 1
        self._num_passes = self.bits // self.DIGIT_BITS
        self._pass = 0
        self._prefixes: list[int] = [0] * len(ranks)  # the answer's integer key, bits fixed so far (high first)
        self._remaining = list(ranks)  # the answer's rank from the top among entries sharing its prefix
        self._histograms: dict[int, torch.Tensor] = {}

    @property
    def done(self) -> bool:
        return self._pass == self._num_passes

    def _keys(self, block: torch.Tensor) -> torch.Tensor:
        """Integers that sort like the floats: negative floats get their magnitude bits flipped."""
        integers = block.contiguous().reshape(-1).view(self._integer_dtype)
        return integers ^ ((integers >> (self.bits - 1)) & self._magnitude_mask)

    def update(self, block: torch.Tensor) -> None:
        """Count one block of the tensor's entries (any shape, `dtype`) into this pass's histograms."""
        if block.dtype != self.dtype:
            raise ValueError(f"block dtype {block.dtype} != the selector's {self.dtype}; convert it first.")
        if self.done:
            raise RuntimeError("every pass is finished; read values().")
        keys = self._keys(block)
        shift = self.bits - self.DIGIT_BITS * (self._pass + 1)
        high = keys >> shift
        del keys
        if self._pass == 0:  # the top digit carries the sign: offset it so bins sort like the floats
            self._add(0, high.long() + 2 ** (self.DIGIT_BITS - 1))
            return
        for prefix in set(self._prefixes):
            self._add(prefix, (high[(high >> self.DIGIT_BITS) == prefix] & (2**self.DIGIT_BITS - 1)).long())

    def _add(self, prefix: int, digits: torch.Tensor) -> None:
        counts = torch.bincount(digits, minlength=2**self.DIGIT_BITS)
        if prefix in self._histograms:
            self._histograms[prefix] += counts
        else:
            self._histograms[prefix] = counts

    def finish_pass(self) -> None:
        """Fix the next 16 bits of each answer from the histograms of the pass just fed."""
        for index, (prefix, remaining) in enumerate(zip(self._prefixes, self._remaining, strict=True)):
            counts = self._histograms.get(prefix)
            if counts is None:
                raise RuntimeError("finish_pass() before any update() of this pass; feed every block first.")
            from_top = counts.flip(0).cumsum(0)  # entries at or above each digit, highest digit first
            position = int(torch.searchsorted(from_top, remaining))
            if position >= from_top.numel():
                raise RuntimeError(f"the blocks fed hold fewer than {remaining} entries; feed the whole tensor.")
            digit = 2**self.DIGIT_BITS - 1 - position
            self._remaining[index] = remaining - int(from_top[position] - counts[digit])
            if self._pass == 0:
                self._prefixes[index] = digit - 2 ** (self.DIGIT_BITS - 1)
            else:
                self._prefixes[index] = (prefix << self.DIGIT_BITS) | digit
        self._histograms = {}
        self._pass += 1

    def values(self) -> list[torch.Tensor]:
        """The k-th largest entry for each rank (0-dim tensors of `dtype`), once every pass is finished."""
        if not self.done:
            raise RuntimeError(f"{self._num_passes - self._pass} more pass(es) over the blocks are needed.")
        keys = torch.tensor(self._prefixes, dtype=self._integer_dtype)
        floats = (keys ^ ((keys >> (self.bits - 1)) & self._magnitude_mask)).view(self.dtype)
        return list(floats.unbind())


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


def breadcrumbs_thresholds(
    delta: torch.Tensor, density: float, gamma: float, magnitudes_given: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(low, high)` magnitudes of Model Breadcrumbs' mask: entries with `low <= |delta| < high` are kept.

    `high` is the `floor(gamma * numel)`-th largest magnitude (those at or above it are the outliers removed;
    `inf` when none is), `low` the `(floor(gamma * numel) + ceil(density * numel))`-th largest, so a `density`
    share of all entries is kept, just below the outliers. With `magnitudes_given=True`, `delta` already holds
    absolute values. No full-size copy is made (:class:`KthLargest`).
    """
    ranks = _breadcrumbs_ranks(delta.numel(), density, gamma)
    selector = KthLargest([rank for rank in ranks if rank > 0], delta.numel(), delta.dtype)
    return _breadcrumbs_bounds(ranks, _select_in_memory(selector, delta, magnitudes_given))


def _breadcrumbs_ranks(count: int, density: float, gamma: float) -> tuple[int, int]:
    """Ranks from the top of `(low, high)`; high's rank is 0 (no outlier removed) when `gamma * count` < 1."""
    num_outliers = min(count - 1, math.floor(gamma * count))
    num_kept = min(count - num_outliers, max(1, math.ceil(density * count)))
    return num_outliers + num_kept, num_outliers


def _breadcrumbs_bounds(ranks: tuple[int, int], selected: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(low, high)` from the values :class:`KthLargest` selected for the positive ones of `ranks`."""
    low = selected[0]
    return low, selected[1] if ranks[1] > 0 else low.new_tensor(math.inf)


def breadcrumbs_mask(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    thresholds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs' sparsified task vector: zero the `gamma` share of largest-magnitude entries and all but
    the next `density` share (https://huggingface.co/papers/2312.06795).

    `thresholds` (from :func:`breadcrumbs_thresholds` on the whole tensor) lets a slice be masked as the whole
    tensor would be.
    """
    low, high = thresholds if thresholds is not None else breadcrumbs_thresholds(delta, density, gamma)
    magnitudes = delta.abs()
    return torch.where((magnitudes >= low) & (magnitudes < high), delta, torch.zeros_like(delta))


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability of each entry: `density - epsilon + 2 * epsilon * r`, where `r` in [0, 1] is
    the entry's magnitude rank within its row (0 for the smallest), so larger entries are kept more often
    (https://huggingface.co/papers/2406.11617).

    Rows are the first dimension of a tensor of 2 or more dimensions (the rest flattened); a 1-D tensor is one
    row. A row of one entry gets `density`.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    row_length = rows.shape[1]
    if row_length < 2:
        return torch.full_like(delta, density)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(delta.dtype)  # 0 = smallest magnitude of the row
    probabilities = (density - epsilon) + (2 * epsilon / (row_length - 1)) * ranks
    return probabilities.reshape(delta.shape)


def della_prune(delta: torch.Tensor, density: float, epsilon: float, uniforms: torch.Tensor) -> torch.Tensor:
    """MagPrune: keep each entry with its :func:`della_keep_probabilities` (entry kept where `uniforms` < it),
    and divide kept entries by their keep probability, so the pruned task vector is unbiased."""
    if density >= 1.0:
        return delta
    probabilities = della_keep_probabilities(delta, density, epsilon)
    return torch.where(uniforms < probabilities, delta / probabilities, torch.zeros_like(delta))


def seeded_uniforms(
    shape: Sequence[int], seed: int, tensor_name: str, model_index: int, start_row: int = 0, end_row: int | None = None
) -> torch.Tensor:
    """Uniform [0, 1) numbers for rows `start_row:end_row` of a tensor of `shape` (DELLA's random drops).

    They are drawn in fixed groups of rows, each seeded by `(seed, tensor_name, model_index, group)`, so any row
    range gets the same numbers whether the tensor is merged whole or in blocks.
    """
    shape = tuple(shape)
    num_rows = shape[0] if shape else 1
    end_row = num_rows if end_row is None else end_row
    row_elements = math.prod(shape[1:]) if shape else 1
    rows_per_group = max(1, 2**16 // max(1, row_elements))
    parts = []
    for group in range(start_row // rows_per_group, (max(end_row, start_row + 1) - 1) // rows_per_group + 1):
        digest = hashlib.sha256(f"{seed}:{tensor_name}:{model_index}:{group}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        group_start = group * rows_per_group
        group_rows = min(num_rows, group_start + rows_per_group) - group_start
        values = torch.rand((group_rows, row_elements), generator=generator)
        parts.append(values[max(0, start_row - group_start) : end_row - group_start])
    uniforms = torch.cat(parts) if parts else torch.empty((0, row_elements))
    return uniforms.reshape((end_row - start_row, *shape[1:]) if shape else ())


def model_stock_ratio(cosine: float, count: int) -> float:
    """Model Stock's interpolation ratio `t = N cos / (1 + (N - 1) cos)` towards the fine-tunes' average
    (https://huggingface.co/papers/2403.19522), or 0 (keep the base) where the denominator vanishes."""
    denominator = 1 + (count - 1) * cosine
    if abs(denominator) < 1e-6:
        return 0.0
    return count * cosine / denominator


def model_stock_cosine(dots: dict[tuple[int, int], float], squared_norms: list[float]) -> float:
    """Mean pairwise cosine between task vectors, from their dot products `dots[(i, j)]` (i < j) and squared
    norms; a pair where either task vector is zero counts as cosine 0."""
    cosines = []
    for (first, second), dot in dots.items():
        norm_product = math.sqrt(squared_norms[first] * squared_norms[second])
        cosines.append(0.0 if norm_product == 0 else max(-1.0, min(1.0, dot / norm_product)))
    return sum(cosines) / len(cosines)


def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Model Stock of one tensor: `t * mean(tensors) + (1 - t) * base`, `t` from the mean pairwise angle between
    the task vectors `tensor - base` (needs at least 2 fine-tunes)."""
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned tensors besides the base, got {len(tensors)}.")
    deltas = [(tensor - base).double().flatten() for tensor in tensors]
    dots = {(i, j): float(deltas[i] @ deltas[j]) for i in range(len(deltas)) for j in range(i + 1, len(deltas))}
    ratio = model_stock_ratio(model_stock_cosine(dots, [float(d @ d) for d in deltas]), len(deltas))
    return _model_stock_combine(tensors, base, ratio)


def _model_stock_combine(tensors: Sequence[torch.Tensor], base: torch.Tensor, ratio: float) -> torch.Tensor:
    average = tensors[0].clone()
    for tensor in tensors[1:]:
        average += tensor
    average /= len(tensors)
    return ratio * average + (1 - ratio) * base


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
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    breadcrumbs_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    della_uniforms: Sequence[torch.Tensor] | None = None,
    stock_ratio: float | None = None,
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
        gamma (`float`, *optional*, defaults to 0.01): `breadcrumbs`: share of largest-magnitude entries removed.
        epsilon (`float`, *optional*, defaults to 0.15): `della*`: spread of the keep probabilities around
            `density`.
        breadcrumbs_bounds (`list[tuple[torch.Tensor, torch.Tensor]]`, *optional*): per-tensor
            :func:`breadcrumbs_thresholds` of whole tensors, when `tensors` are slices.
        della_uniforms (`list[torch.Tensor]`, *optional*): `della*`: uniform [0, 1) numbers deciding the random
            drops, one tensor per input (:func:`seeded_uniforms`); required by `della*`.
        stock_ratio (`float`, *optional*): `model_stock`: the ratio of whole tensors, when `tensors` are
            slices (:func:`model_stock_ratio`).
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
    if method == "model_stock":
        if stock_ratio is None:
            return model_stock(tensors, base)
        return _model_stock_combine(tensors, base, stock_ratio)
    deltas = [tensor - base for tensor in tensors]
    if method == "breadcrumbs":
        bounds = breadcrumbs_bounds or [None] * len(deltas)
        merged = base.clone()
        for weight, delta, bound in zip(weights, deltas, bounds, strict=True):
            merged += weight * breadcrumbs_mask(delta, density, gamma, bound)
        return merged
    if method in ("della", "della_linear"):
        if della_uniforms is None:
            raise ValueError(f"merge method {method!r} needs della_uniforms (see seeded_uniforms).")
        deltas = [
            della_prune(delta, density, epsilon, uniforms)
            for delta, uniforms in zip(deltas, della_uniforms, strict=True)
        ]
        if method == "della":
            return base + _disjoint_merge(deltas, list(weights))
        merged = base.clone()
        for weight, delta in zip(weights, deltas, strict=True):
            merged += weight * delta
        return merged
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
