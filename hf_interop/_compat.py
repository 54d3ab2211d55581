"""Shims over the transformers releases hf_interop supports: names that changed between them, looked up once."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def cache_argument() -> str:
    """The keyword under which `generate()` hands a model its cache: `cache` from the transformers releases that
    renamed it (`past_key_values` still works there with a deprecation warning until 5.40), `past_key_values`
    before. Ensembles accept both and pass members this one."""
    import inspect

    from transformers import GenerationMixin

    try:
        parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(outputs: Any) -> Any:
    """A model output's cache, under either name the installed transformers gives it (`cache` first: reading
    `past_key_values` where it was renamed logs a deprecation warning)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


@functools.cache
def output_cache_field() -> str:
    """The field under which the installed transformers' model outputs carry a cache (`cache` or
    `past_key_values`), so outputs we build do not trip its deprecation warning."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"
