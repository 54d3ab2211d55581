"""`EnsembleCache`: the members' own KV caches, carried by `generate()` between steps as one `Cache`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from transformers.cache_utils import Cache

if TYPE_CHECKING:
    import torch


class EnsembleCache(Cache):
    """One cache per member, carried by `generate()` as a single `Cache`.

    Every cache operation `generate()` performs (length queries, beam reordering, cropping, batch selection) is
    applied to each member's cache on that cache's own device.
    """

    is_compileable = False

    def __init__(self, member_caches: Sequence[Cache | None]):
        # No Cache.__init__: this container owns no layers of its own.
        self.member_caches = list(member_caches)
        self.offloading = False

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(member_caches={self.member_caches})"

    def _present(self) -> list[Cache]:
        return [cache for cache in self.member_caches if cache is not None]

    @property
    def layers(self) -> list:
        return [layer for cache in self._present() for layer in getattr(cache, "layers", [])]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        lengths = [cache.get_seq_length() for cache in self._present()]
        return lengths[0] if lengths else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        lengths = [cache.get_max_length() for cache in self._present()]
        bounded = [length for length in lengths if length is not None and length >= 0]
        return min(bounded) if bounded else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self._present():
            cache.reorder_cache(beam_idx)

    def reset(self) -> None:
        for cache in self._present():
            cache.reset()

    def crop(self, tokens_to_remove: int) -> None:
        for cache in self._present():
            cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self._present():
            cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self._present():
            cache.batch_select_indices(indices)

    def activate_past_recording(self) -> None:
        for cache in self._present():
            cache.activate_past_recording()

    @property
    def is_initialized(self) -> bool:
        return bool(self._present()) and all(cache.is_initialized for cache in self._present())

    @property
    def is_croppable(self) -> bool:
        return all(cache.is_croppable for cache in self._present())

    @property
    def batch_size(self) -> int:
        sizes = [cache.batch_size for cache in self._present()]
        return sizes[0] if sizes else -1

    @property
    def is_sliding(self) -> list[bool]:
        return [flag for cache in self._present() for flag in cache.is_sliding]

    @property
    def is_linear(self) -> list[bool]:
        return [flag for cache in self._present() for flag in cache.is_linear]

    @property
    def is_dummy(self) -> list[bool]:
        return [flag for cache in self._present() for flag in cache.is_dummy]
