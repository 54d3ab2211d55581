"""Learned member weights for causal LM ensembles (stacking for LMs), fit by held-out negative log-likelihood.

Members stay frozen: their log-probabilities on the fitting set are computed once, then only the softmax-
parametrised weights are optimised, which takes well under a second. For `mixture` only each member's
log-probability of the target token is needed (`num_members x num_tokens` numbers); `product` and `max`
renormalise over the vocabulary, so they keep full distributions (bounded by `max_cache_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..logging_utils import get_logger

if TYPE_CHECKING:
    from datasets import Dataset

    from .causal_lm import EnsembleForCausalLM

logger = get_logger(__name__)


@dataclass
class EnsembleWeightFit:
    """Result of :func:`fit_ensemble_weights`: weights and NLLs (nats per token) on the fitting set."""

    weights: list[float]
    initial_weights: list[float]
    member_nll: list[float]
    uniform_nll: float
    initial_nll: float
    nll: float
    num_tokens: int
    combination: str
    history: list[float] = field(default_factory=list)


def perplexity_init_weights(member_nll: Sequence[float], temperature: float = 1.0) -> list[float]:
    """PackLLM-style initial weights (https://huggingface.co/papers/2404.11531): `softmax(-log(perplexity_i) / temperature)`.

    A member with lower perplexity on the prompts gets more weight; `temperature` -> infinity gives uniform weights.
    """
    if not temperature > 0:
        raise ValueError(f"init_temperature must be > 0; got {temperature!r}.")
    scores = torch.tensor([-float(nll) / temperature for nll in member_nll], dtype=torch.float64)
    return torch.softmax(scores, dim=0).tolist()


def mixture_nll(target_log_probs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Mean NLL of targets under a mixture; `target_log_probs` `(num_members, num_tokens)`, `log_weights` normalised."""
    return -torch.logsumexp(target_log_probs + log_weights[:, None], dim=0).mean()


def _renormalised_nll(
    full_log_probs: torch.Tensor, targets: torch.Tensor, log_weights: torch.Tensor, combination: str
) -> torch.Tensor:
    from .combination import maximum, product

    weights = log_weights.exp()
    combined = product(full_log_probs, weights) if combination == "product" else maximum(full_log_probs, weights)
    return -combined.gather(-1, targets[:, None]).squeeze(-1).mean()


@torch.no_grad()
def collect_member_log_probs(
    ensemble: EnsembleForCausalLM,
    dataset: Dataset,
    batch_size: int = 8,
    full_distribution: bool = False,
    max_tokens: int | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' log-probabilities of each target token (or of the whole vocabulary) on packed blocks.

    Returns:
        `(log_probs, targets)`: `log_probs` is `(num_members, num_tokens)` (or `(num_members, num_tokens, vocab)`
        with `full_distribution`), float32 on CPU; `targets` `(num_tokens,)`. Position t predicts label t+1;
        labels of -100 and padding are skipped.
    """
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("dataset is empty; pass packed blocks (hf_interop.pack_dataset) to fit the weights on.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"dataset has columns {dataset.column_names} but no 'input_ids'; tokenize and pack it first "
            "(hf_interop.pack_dataset)."
        )
    chunks, target_chunks = [], []
    collected = 0
    device = ensemble.device
    for start in tqdm(range(0, len(dataset), batch_size), desc="Member log-probs", disable=not show_progress):
        rows = dataset[start : start + batch_size]
        input_ids = torch.tensor(rows["input_ids"], device=device)
        labels = torch.tensor(rows["labels"] if "labels" in rows else rows["input_ids"], device=device)
        attention_mask = torch.tensor(rows["attention_mask"], device=device) if "attention_mask" in rows else None
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        log_probs, _ = ensemble.member_log_probs(input_ids, attention_mask, use_cache=False)
        shift_labels = labels[:, 1:].to(log_probs.device)
        keep = shift_labels != -100
        targets = shift_labels[keep]
        selected = log_probs[:, :, :-1][:, keep]  # (M, tokens, vocab)
        if full_distribution:
            chunks.append(selected.cpu())
        else:
            chunks.append(
                selected.gather(-1, targets[None, :, None].expand(selected.shape[0], -1, 1)).squeeze(-1).cpu()
            )
        target_chunks.append(targets.cpu())
        collected += targets.numel()
        if max_tokens is not None and collected >= max_tokens:
            break
    log_probs = torch.cat(chunks, dim=1)
    targets = torch.cat(target_chunks)
    if max_tokens is not None:
        log_probs, targets = log_probs[:, :max_tokens], targets[:max_tokens]
    return log_probs, targets


def fit_ensemble_weights(
    ensemble: EnsembleForCausalLM,
    dataset: Dataset,
    *,
    combination: str | None = None,
    init: str | Sequence[float] = "perplexity",
    init_temperature: float = 1.0,
    max_steps: int = 300,
    learning_rate: float = 0.05,
    batch_size: int = 8,
    max_tokens: int | None = None,
    max_cache_bytes: int = 2**30,
    apply: bool = True,
    show_progress: bool = False,
) -> EnsembleWeightFit:
    """Fit an ensemble's member weights by minimising negative log-likelihood on held-out blocks.

    The weights are `softmax(theta)` (always a valid mixture), the members frozen; their log-probabilities on
    `dataset` are computed once and `theta` is optimised with Adam on those (the fast version of training an
    ensemble head). Fit on a split the members were not trained on, then report perplexity on another.

    Args:
        ensemble (`EnsembleForCausalLM`): the ensemble; its combination rule is used unless `combination` is given.
        dataset (`datasets.Dataset`): packed blocks with `input_ids` (and optionally `labels`, `attention_mask`).
        combination (`str`, *optional*): `"mixture"`, `"product"` or `"max"` (`"contrastive"` has no weights).
        init (`str` or `list[float]`, *optional*, defaults to `"perplexity"`): starting weights: `"perplexity"`
            (PackLLM-style, from each member's perplexity on `dataset`), `"uniform"`, or explicit weights.
        init_temperature (`float`, *optional*, defaults to 1.0): temperature of the perplexity initialisation.
        max_steps (`int`, *optional*, defaults to 300): Adam steps on the full token set.
        learning_rate (`float`, *optional*, defaults to 0.05): Adam learning rate on `theta`.
        batch_size (`int`, *optional*, defaults to 8): blocks per forward pass when collecting member log-probs.
        max_tokens (`int`, *optional*): use at most this many target tokens.
        max_cache_bytes (`int`, *optional*, defaults to 1 GiB): memory bound on stored full distributions
            (`product`/`max` only).
        apply (`bool`, *optional*, defaults to `True`): write the fitted weights (and rule) into the ensemble.
        show_progress (`bool`, *optional*, defaults to `False`): progress bar while collecting.

    Returns:
        :class:`EnsembleWeightFit` with the weights, the initial weights and each NLL on `dataset`.
    """
    combination = combination or ensemble.config.combination
    _check_fit_settings(combination, max_steps, learning_rate)
    num_members = ensemble.num_members
    full = combination != "mixture"
    if full:
        _check_full_distributions_fit(ensemble, dataset, combination, max_tokens, max_cache_bytes)
    log_probs, targets = collect_member_log_probs(
        ensemble,
        dataset,
        batch_size=batch_size,
        full_distribution=full,
        max_tokens=max_tokens,
        show_progress=show_progress,
    )
    if full:
        member_target = log_probs.gather(-1, targets[None, :, None].expand(num_members, -1, 1)).squeeze(-1)
    else:
        member_target = log_probs
    member_nll = (-member_target.double().mean(dim=1)).tolist()

    def objective(log_weights: torch.Tensor) -> torch.Tensor:
        if full:
            return _renormalised_nll(log_probs, targets, log_weights, combination)
        return mixture_nll(log_probs, log_weights)

    initial = _initial_weights(init, member_nll, init_temperature, num_members)
    with torch.no_grad():
        uniform_nll = objective(torch.full((num_members,), -math.log(num_members))).item()
    best_theta, history = _minimise_nll(objective, initial, max_steps, learning_rate)
    initial_nll = history[0]
    with torch.no_grad():
        final_nll = objective(torch.log_softmax(best_theta, 0)).item()
    weights = torch.softmax(best_theta, 0).tolist()
    if apply:
        ensemble.set_member_weights(weights)
        ensemble.config.combination = combination
    logger.info(
        f"Fitted {combination} weights {[round(w, 4) for w in weights]}: NLL {initial_nll:.4f} -> {final_nll:.4f} "
        f"(uniform {uniform_nll:.4f}, members {[round(n, 4) for n in member_nll]})."
    )
    return EnsembleWeightFit(
        weights=weights,
        initial_weights=list(initial),
        member_nll=member_nll,
        uniform_nll=uniform_nll,
        initial_nll=initial_nll,
        nll=final_nll,
        num_tokens=int(targets.numel()),
        combination=combination,
        history=history,
    )


def _check_fit_settings(combination: str, max_steps: int, learning_rate: float) -> None:
    if combination == "contrastive":
        raise ValueError(
            "combination='contrastive' has no member weights to fit (expert and amateur roles are fixed); use "
            "'mixture', 'product' or 'max'."
        )
    if combination not in ("mixture", "product", "max"):
        raise ValueError(f"combination {combination!r} cannot be fitted; use 'mixture', 'product' or 'max'.")
    if max_steps < 0 or learning_rate <= 0:
        raise ValueError(f"need max_steps >= 0 and learning_rate > 0; got {max_steps} and {learning_rate}.")


def _check_full_distributions_fit(
    ensemble: EnsembleForCausalLM, dataset: Dataset, combination: str, max_tokens: int | None, max_cache_bytes: int
) -> None:
    """Refuse, before any forward pass, to keep member distributions over the vocabulary beyond `max_cache_bytes`."""
    rows = min(len(dataset), math.ceil((max_tokens or 10**12) / max(1, len(dataset[0]["input_ids"]) - 1)))
    estimate = ensemble.num_members * rows * (len(dataset[0]["input_ids"]) - 1) * ensemble.config.vocab_size * 4
    if estimate > max_cache_bytes:
        raise ValueError(
            f"fitting {combination!r} weights keeps full member distributions: about {estimate / 2**30:.2f} GiB "
            f"for {rows} blocks, over max_cache_bytes={max_cache_bytes / 2**30:.2f} GiB. Pass max_tokens=... (a "
            "few thousand tokens are plenty for a handful of weights) or raise max_cache_bytes."
        )


def _initial_weights(
    init: str | Sequence[float], member_nll: Sequence[float], init_temperature: float, num_members: int
) -> list[float]:
    """Normalised starting weights: `"perplexity"` (PackLLM-style), `"uniform"`, or the given ones."""
    if isinstance(init, str):
        if init == "perplexity":
            return perplexity_init_weights(member_nll, init_temperature)
        if init == "uniform":
            return [1.0 / num_members] * num_members
        raise ValueError(f"init {init!r} is not understood; use 'perplexity', 'uniform' or a list of weights.")
    from .combination import check_weights

    check_weights(list(init), num_members, argument="init")
    total = sum(float(value) for value in init)
    return [float(value) / total for value in init]


def _minimise_nll(
    objective: Callable[[torch.Tensor], torch.Tensor], initial: Sequence[float], max_steps: int, learning_rate: float
) -> tuple[torch.Tensor, list[float]]:
    """Adam on `theta` (weights `softmax(theta)`) from `initial`: the best `theta` seen and the NLL of every step,
    the initial NLL first."""
    # A zero initial weight would be log(0) = -inf: start a hair above it so the optimiser can still move it.
    theta = torch.tensor([math.log(max(weight, 1e-8)) for weight in initial], dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        initial_nll = objective(torch.log_softmax(theta, 0)).item()
    optimizer = torch.optim.Adam([theta], lr=learning_rate)
    history = [initial_nll]
    best_nll, best_theta = initial_nll, theta.detach().clone()
    for _ in range(max_steps):
        optimizer.zero_grad()
        loss = objective(torch.log_softmax(theta, 0))
        loss.backward()
        optimizer.step()
        value = loss.item()
        history.append(value)
        if value < best_nll:
            best_nll, best_theta = value, theta.detach().clone()
    return best_theta, history
