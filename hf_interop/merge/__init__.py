"""Weight-space fusion: merging checkpoints of one architecture, greedy soups, and LoRA adapter combinations."""

from .checkpoints import (  # noqa: F401
    DEFAULT_DENSITY,
    LORA_COMBINATIONS,
    MERGE_METHODS,
    METHODS_NEEDING_BASE,
    METHODS_USING_DENSITY,
    dare_keep_mask,
    greedy_soup,
    magnitude_trim,
    merge_checkpoints,
    merge_lora_adapters,
    merge_state_dicts,
    merge_tensors,
    slerp,
    slerp_coefficients,
    trim_threshold,
)
