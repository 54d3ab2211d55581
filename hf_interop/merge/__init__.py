"""Weight-space fusion: merging checkpoints of one architecture, greedy soups, and LoRA adapter combinations.

- `methods.py`: the math, pure functions over tensors (:func:`merge_tensors` and the methods it dispatches to).
- `streaming.py`: safetensors reads by row blocks, shard writes, and the chunked merge of one tensor.
- `checkpoints.py`: :func:`merge_checkpoints` (folders, streamed) and :func:`merge_state_dicts` (in memory).
- `staging.py`: the output folder: staged, owned while written, cleaned after a killed merge, disk errors named.
- `fitting.py`: :func:`fit_merge_coefficients` (weights learned on held-out text).
- `soup.py`: :func:`greedy_soup`. `lora.py`: :func:`merge_lora_adapters`.
"""

from .checkpoints import merge_checkpoints, merge_state_dicts
from .fitting import FIT_GRANULARITIES, FIT_OBJECTIVES, FITTABLE_METHODS, fit_merge_coefficients
from .lora import LORA_COMBINATIONS, merge_lora_adapters
from .methods import (
    DEFAULT_DENSITY,
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    MERGE_METHODS,
    METHODS_NEEDING_BASE,
    METHODS_USING_DENSITY,
    breadcrumbs_mask,
    breadcrumbs_thresholds,
    dare_keep_mask,
    della_keep_probabilities,
    della_prune,
    magnitude_trim,
    merge_tensors,
    model_stock,
    model_stock_ratio,
    seeded_uniforms,
    slerp,
    slerp_coefficients,
    trim_threshold,
)
from .soup import greedy_soup

__all__ = [
    "FITTABLE_METHODS",
    "FIT_GRANULARITIES",
    "FIT_OBJECTIVES",
    "fit_merge_coefficients",
    "DEFAULT_DENSITY",
    "DEFAULT_EPSILON",
    "DEFAULT_GAMMA",
    "LORA_COMBINATIONS",
    "MERGE_METHODS",
    "METHODS_NEEDING_BASE",
    "METHODS_USING_DENSITY",
    "breadcrumbs_mask",
    "breadcrumbs_thresholds",
    "dare_keep_mask",
    "della_keep_probabilities",
    "della_prune",
    "greedy_soup",
    "magnitude_trim",
    "merge_checkpoints",
    "merge_lora_adapters",
    "merge_state_dicts",
    "merge_tensors",
    "model_stock",
    "model_stock_ratio",
    "seeded_uniforms",
    "slerp",
    "slerp_coefficients",
    "trim_threshold",
]
