"""Bagging's pure math: which examples each member trains on, which members never saw an example, and the
out-of-bag scores computed from those members only.

Bagging (https://link.springer.com/article/10.1007/BF00058655) trains every member on its own resample of the
training set; an example a member did not draw is *out of bag* for it, so the members that skipped it give an
honest held-out prediction for it, for free. The functions here take sizes, index arrays and tensors, and never
look at a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def resolve_max_samples(max_samples: float | int, num_examples: int) -> int:
    """Number of examples each member draws: a float in (0, 1] is a fraction of `num_examples`, an int a count.

    Raises `ValueError` for an empty dataset, a fraction outside (0, 1], a count < 1 or larger than the dataset.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"the training dataset has {num_examples!r} examples; bagging needs at least one example.")
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"max_samples={max_samples!r} must be a fraction in (0, 1] (a float) or a count of examples (an int)."
        )
    if isinstance(max_samples, (float, np.floating)):
        if not (0.0 < float(max_samples) <= 1.0) or math.isnan(float(max_samples)):
            raise ValueError(
                f"max_samples={max_samples!r} as a fraction must lie in (0, 1]; use e.g. 1.0 (as many draws as "
                "examples) or an int for a count."
            )
        return max(1, int(float(max_samples) * num_examples))
    if max_samples < 1 or max_samples > num_examples:
        raise ValueError(
            f"max_samples={max_samples!r} as a count must lie in [1, {num_examples}] (the dataset's size); pass a "
            "smaller count or a fraction such as 0.8."
        )
    return int(max_samples)


def member_sample_indices(
    num_examples: int,
    member_index: int,
    max_samples: float | int = 1.0,
    bootstrap: bool = True,
    random_state: int = 0,
) -> np.ndarray:
    """Sorted indices of the examples member `member_index` trains on (repeats allowed with `bootstrap=True`).

    Each member's generator is seeded from `(random_state, member_index)`, so a member's draw depends neither on how
    many members there are nor on the order they are trained in: a resumed run draws exactly the same samples.
    """
    if isinstance(member_index, bool) or not isinstance(member_index, (int, np.integer)) or member_index < 0:
        raise ValueError(f"member_index={member_index!r} must be an integer >= 0.")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ValueError(f"random_state={random_state!r} must be an integer >= 0 (the seed of the resamples).")
    draws = resolve_max_samples(max_samples, num_examples)
    generator = np.random.default_rng(np.random.SeedSequence([int(random_state), int(member_index)]))
    if bootstrap:
        indices = generator.integers(0, num_examples, size=draws)
    else:
        indices = generator.choice(num_examples, size=draws, replace=False)
    return np.sort(indices.astype(np.int64))


def bootstrap_indices(
    num_examples: int,
    n_estimators: int,
    max_samples: float | int = 1.0,
    bootstrap: bool = True,
    random_state: int = 0,
) -> list[np.ndarray]:
    """`estimators_samples_`: one sorted index array per member (see :func:`member_sample_indices`)."""
    check_n_estimators(n_estimators)
    return [
        member_sample_indices(num_examples, index, max_samples, bootstrap, random_state)
        for index in range(n_estimators)
    ]


def check_n_estimators(n_estimators: int) -> None:
    if isinstance(n_estimators, bool) or not isinstance(n_estimators, (int, np.integer)) or n_estimators < 1:
        raise ValueError(f"n_estimators={n_estimators!r} must be an integer >= 1 (the number of members).")


def out_of_bag_mask(estimators_samples: Sequence[np.ndarray], num_examples: int) -> np.ndarray:
    """Boolean `(num_members, num_examples)`: `True` where the member never drew the example (it is out of bag)."""
    mask = np.ones((len(estimators_samples), num_examples), dtype=bool)
    for member, indices in enumerate(estimators_samples):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
            raise ValueError(
                f"estimators_samples[{member}] holds indices outside [0, {num_examples}); they must index the "
                "training dataset the members were drawn from."
            )
        mask[member, indices] = False
    return mask


def oob_classification_score(
    member_probabilities: torch.Tensor, oob_mask: np.ndarray | torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Out-of-bag accuracy of a soft-voting classifier ensemble, as scikit-learn's `BaggingClassifier.oob_score_`.

    Args:
        member_probabilities (`torch.Tensor`): `(num_members, num_examples, num_labels)` class probabilities of every
            member on every training example.
        oob_mask (`np.ndarray` or `torch.Tensor`): `(num_members, num_examples)` from :func:`out_of_bag_mask`.
        labels (`torch.Tensor`): `(num_examples,)` class ids.

    Returns:
        `dict` with `oob_accuracy` (over the examples with at least one out-of-bag member), `oob_coverage` (the
        share of examples that have one) and `oob_examples`. Examples every member saw are left out, as scikit-learn
        does (it warns when there are any).
    """
    import torch

    mask = torch.as_tensor(np.asarray(oob_mask), device=member_probabilities.device)
    if mask.shape != member_probabilities.shape[:2]:
        raise ValueError(
            f"oob_mask has shape {tuple(mask.shape)} but member_probabilities has {tuple(member_probabilities.shape)}; "
            "they need the same (num_members, num_examples)."
        )
    vote, covered = oob_vote(member_probabilities, mask)
    labels = labels.to(vote.device)
    correct = (vote.argmax(-1) == labels) & covered
    count = int(covered.sum())
    result = {
        "oob_accuracy": float(correct.sum()) / count if count else float("nan"),
        "oob_coverage": count / mask.shape[1],
        "oob_examples": float(count),
        "oob_log_loss": float("nan"),
        "oob_ece": float("nan"),
    }
    if count:
        from .calibration import expected_calibration_error

        picked = vote[covered].gather(1, labels[covered][:, None]).squeeze(1)
        result["oob_log_loss"] = float(-picked.clamp_min(1e-300).log().mean())
        result["oob_ece"] = expected_calibration_error(vote[covered].amax(-1), correct[covered])
    return result


def oob_vote(
    member_probabilities: torch.Tensor, oob_mask: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's soft vote among its out-of-bag members only: `(votes, covered)`.

    `votes` `(num_examples, num_labels)` float64 is the mean class probability over the members that did not draw
    the example (zeros where every member drew it); `covered` `(num_examples,)` marks the examples that have one.
    """
    import torch

    mask = torch.as_tensor(np.asarray(oob_mask), device=member_probabilities.device)
    counts = mask.sum(0).double()
    summed = (member_probabilities.double() * mask.unsqueeze(-1)).sum(0)
    return summed / counts.clamp_min(1.0)[:, None], counts > 0


def oob_language_model_score(
    member_target_log_probs: torch.Tensor,
    oob_mask: np.ndarray | torch.Tensor,
    target_mask: torch.Tensor,
    num_bytes: torch.Tensor | Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Out-of-bag perplexity (and bits per byte) of a mixture ensemble of causal LMs.

    Each block is scored by the mixture of its out-of-bag members only (their weights renormalised over those
    members): the probability of every target token is the weighted mean of those members' probabilities.

    Args:
        member_target_log_probs (`torch.Tensor`): `(num_members, num_blocks, num_targets)` log-probability each
            member gives the observed next token.
        oob_mask: `(num_members, num_blocks)` from :func:`out_of_bag_mask`.
        target_mask (`torch.Tensor`): `(num_blocks, num_targets)`, `True` for real targets (not padding/-100).
        num_bytes (*optional*): UTF-8 bytes of each block's target text; gives `oob_bits_per_byte`.
        weights (*optional*): member weights (uniform when `None`).

    Returns:
        `dict` with `oob_perplexity`, `oob_nll` (nats per token), `oob_bits_per_byte` (when `num_bytes` is given),
        `oob_coverage` and `oob_examples`.
    """
    import torch

    log_probs = member_target_log_probs.double()
    num_members = log_probs.shape[0]
    mask = torch.as_tensor(np.asarray(oob_mask), device=log_probs.device)
    if mask.shape != log_probs.shape[:2]:
        raise ValueError(
            f"oob_mask has shape {tuple(mask.shape)} but member_target_log_probs has {tuple(log_probs.shape)}; they "
            "need the same (num_members, num_blocks)."
        )
    member_weights = torch.full((num_members,), 1.0, dtype=torch.float64, device=log_probs.device)
    if weights is not None:
        member_weights = torch.tensor([float(weight) for weight in weights], dtype=torch.float64)
    block_weights = member_weights[:, None] * mask  # (members, blocks)
    covered = block_weights.sum(0) > 0
    log_block_weights = torch.log(block_weights / block_weights.sum(0).clamp_min(1e-300))
    mixed = torch.logsumexp(log_probs + log_block_weights[:, :, None], dim=0)  # (blocks, targets)
    targets = target_mask.to(log_probs.device).bool() & covered[:, None]
    total_nll = -(mixed * targets).nan_to_num(0.0).sum()
    num_tokens = int(targets.sum())
    result = {
        "oob_nll": float(total_nll) / num_tokens if num_tokens else float("nan"),
        "oob_coverage": int(covered.sum()) / mask.shape[1],
        "oob_examples": float(int(covered.sum())),
    }
    result["oob_perplexity"] = math.exp(result["oob_nll"]) if num_tokens else float("nan")
    if num_bytes is not None:
        byte_counts = torch.as_tensor(np.asarray(num_bytes), dtype=torch.float64)
        total_bytes = float(byte_counts[covered.cpu()].sum())
        result["oob_bits_per_byte"] = float(total_nll) / math.log(2) / total_bytes if total_bytes else float("nan")
    return result
