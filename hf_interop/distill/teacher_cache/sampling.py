"""The draws of a sampled teacher cache (`encoding="sampled"`, format version 3).

Per position, `sample_draws` (`N`) tokens are drawn from the teacher's distribution by inverse-CDF sampling; row `r`
of the cache takes its uniforms from `numpy.random.default_rng((sample_seed, r))`, `N` per position in order, so a
row's draws depend on the row, the seed and the teacher only (not on batching, shards, processes or a resume).

- An in-process teacher (:func:`draw_from_logits`): the draws come from its whole vocabulary (the softmax of its
  logits at the cache's temperature). The stored counts `c / N` are an unbiased estimate of every token's
  probability and the stored distribution has no tail, so the forward-KL gradient a student gets is unbiased
  (Sparse Logit Sampling, Anshumann et al. 2025, https://huggingface.co/papers/2503.16870). Tokens outside any
  top-k come up in proportion to their probability: that is the information a top-k cache's tail bucket loses.
- A served teacher returns its top-k only (:func:`draw_counts`): the draws come from those entries, the mass they
  leave being one more outcome (the tail) whose draws become the stored tail.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def row_uniforms(sample_seed: int, row_index: int, positions: int, sample_draws: int) -> np.ndarray:
    """The uniforms in [0, 1) of cache row `row_index`: `(positions, sample_draws)` float64."""
    return np.random.default_rng((int(sample_seed), int(row_index))).random((positions, sample_draws))


def draw_counts(
    logprobs: np.ndarray, positions_per_row: np.ndarray, sample_draws: int, sample_seed: int, first_row: int
) -> np.ndarray:
    """Per position, how often each of its entries comes up in `sample_draws` draws from its distribution.

    `logprobs` `(P, k)` (float16 or float32, `-inf` = missing, sorted as the caller likes) are the rows' positions
    one after the other, `positions_per_row` how many each row has; the mass the entries leave (`1 - sum p`, the
    tail) is one more outcome, whose draws are not returned. Row `r` is the `first_row + r`-th of the cache.
    Vectorised over every position and draw at once. Returns `(P, k)` int64.
    """
    num_positions, width = logprobs.shape
    cumulative = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=-1)  # exp(-inf) = 0: never drawn
    uniforms = np.empty((num_positions, sample_draws), dtype=np.float64)
    start = 0
    for offset, positions in enumerate(positions_per_row.tolist()):
        uniforms[start : start + positions] = row_uniforms(sample_seed, first_row + offset, positions, sample_draws)
        start += positions
    # a draw u lands on entry j when cumulative[j - 1] <= u < cumulative[j], past the last one in the tail (j = k).
    # Position i's values are moved to [2i, 2i + 1] so one searchsorted serves every position: the count of values
    # <= u + 2i is i * k (earlier positions) plus j.
    lift = 2.0 * np.arange(num_positions, dtype=np.float64)[:, None]
    found = np.searchsorted((cumulative + lift).reshape(-1), (uniforms + lift).reshape(-1), side="right")
    landed = found.reshape(num_positions, sample_draws) - width * np.arange(num_positions)[:, None]
    slots = (landed + (width + 1) * np.arange(num_positions)[:, None]).reshape(-1)
    counts = np.bincount(slots, minlength=num_positions * (width + 1)).reshape(num_positions, width + 1)
    return counts[:, :width].astype(np.int64, copy=False)


def draw_from_logits(logits: Any, temperature: float, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw tokens from `softmax(logits / temperature)` over the whole vocabulary, one per uniform.

    Args:
        logits (`torch.Tensor` of shape `(P, V)`): one row's positions (any float dtype, any device).
        temperature (`float`): the cache's temperature.
        uniforms (`np.ndarray` of shape `(P, N)`): the row's uniforms (:func:`row_uniforms`).

    Returns:
        `(ids (P, N) int64, counts (P, N) int32)`: each position's drawn ids sorted, and at the first of each run of
        equal ids the run's length (0 elsewhere): the distinct drawn ids with their counts, as `codec.encode_rows`
        takes pre-drawn rows.
    """
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1).double()
    cumulative = probs.cumsum_(dim=-1)
    cumulative /= cumulative[:, -1:].clone()  # the last edge exactly 1: every u < 1 lands on a token
    targets = torch.from_numpy(uniforms).to(cumulative.device)
    # the first edge above u: token j when cumulative[j - 1] <= u < cumulative[j] (a token without mass never)
    ids = torch.searchsorted(cumulative, targets, right=True).clamp_(max=probs.shape[-1] - 1).cpu().numpy()
    ids.sort(axis=-1)
    # a run of equal ids starts where the id changes (and at every position's first draw); its length is the distance
    # to the next start in row-major order
    starts = np.ones(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = np.flatnonzero(starts)
    counts = np.zeros(ids.shape, dtype=np.int32)
    counts.reshape(-1)[first] = np.diff(first, append=ids.size)
    return ids, counts
