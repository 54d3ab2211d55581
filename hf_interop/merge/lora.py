"""Combining LoRA adapters of one base into a new adapter (PEFT's `add_weighted_adapter`, minus its pitfalls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .methods import DEFAULT_DENSITY

if TYPE_CHECKING:
    from peft import PeftModel

LORA_COMBINATIONS = ("cat", "linear", "svd", "ties")


def merge_lora_adapters(
    peft_model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float] | None = None,
    combination_type: str = "cat",
    adapter_name: str = "merged",
    density: float | None = None,
    svd_rank: int | None = None,
    set_active: bool = True,
) -> str:
    """Combine LoRA adapters of one base into a new adapter with PEFT's `add_weighted_adapter`, minus its pitfalls.

    - `cat` is exact: the new adapter's update is sum_i w_i * scaling_i * B_i A_i (its rank is the sum of ranks).
    - `svd` is the best rank-`svd_rank` approximation of that same sum.
    - `linear` combines A and B matrices separately, which adds cross terms between adapters (exact only for a
      single adapter); it needs equal ranks.
    - `ties` applies TIES to A and B separately (`density` kept); it needs equal ranks.

    Pitfalls handled here: PEFT keeps `use_rslora` of the first adapter for the merged one while already folding
    each adapter's scaling into its weights, which scales the merged update by sqrt(rank) too much; the merged
    adapter is given scaling 1 instead. Unequal ranks with `linear`/`ties` raise a clear error before any work
    (use `cat` or `svd`). An existing `adapter_name` raises instead of silently doing nothing. DoRA adapters are
    refused (their magnitude vectors are not combined). Negative weights subtract an adapter's update.

    Args:
        peft_model (`PeftModel`): model holding the adapters.
        adapters (`list[str]`): names of the adapters to combine.
        weights (`list[float]`, *optional*): one per adapter; defaults to 1.0 each (the updates add up).
        combination_type (`str`, *optional*, defaults to `"cat"`): one of `cat`, `linear`, `svd`, `ties`.
        adapter_name (`str`, *optional*, defaults to `"merged"`): name of the new adapter.
        density (`float`, *optional*): for `ties`, in (0, 1]; defaults to 0.5.
        svd_rank (`int`, *optional*): rank of the `svd` result; defaults to the largest input rank.
        set_active (`bool`, *optional*, defaults to `True`): make the new adapter the active one.

    Returns:
        `str`: the new adapter's name.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora_adapters needs a peft.PeftModel, got {type(peft_model).__name__}.")
    if combination_type not in LORA_COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not one of {list(LORA_COMBINATIONS)}.")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters is empty; pass the names of the adapters to combine.")
    unknown = [name for name in adapters if name not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"adapters {unknown} are not in the model (it has {sorted(peft_model.peft_config)}).")
    if adapter_name in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} already exists in the model; choose a new name (PEFT would otherwise "
            "silently keep the old adapter)."
        )
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights has {len(weights)} values for {len(adapters)} adapters; pass one per adapter.")
    configs = [peft_model.peft_config[name] for name in adapters]
    if any(getattr(config, "use_dora", False) for config in configs):
        raise ValueError("DoRA adapters cannot be combined (their magnitude vectors are not merged); use plain LoRA.")
    ranks = {name: config.r for name, config in zip(adapters, configs, strict=True)}
    if combination_type in ("linear", "ties") and len(adapters) > 1 and len(set(ranks.values())) > 1:
        raise ValueError(
            f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; use "
            "combination_type='cat' (exact, rank = sum of ranks) or 'svd' (rank svd_rank)."
        )
    if combination_type == "ties":
        density = DEFAULT_DENSITY if density is None else density
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} must be in (0, 1] for combination_type='ties'.")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights={weights} must be positive for combination_type='ties'.")

    peft_model.add_weighted_adapter(
        adapters=adapters,
        weights=weights,
        adapter_name=adapter_name,
        combination_type=combination_type,
        svd_rank=svd_rank,
        density=density,
    )
    merged_config = peft_model.peft_config[adapter_name]
    # add_weighted_adapter folds each source's scaling into the new weights and sets lora_alpha = r, so the new
    # adapter must apply scaling 1; with use_rslora inherited it would apply r / sqrt(r) = sqrt(r).
    merged_config.use_rslora = False
    merged_config.lora_alpha = merged_config.r
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.scaling[adapter_name] = 1.0
    if set_active:
        peft_model.set_adapter(adapter_name)
    return adapter_name
