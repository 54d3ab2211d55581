"""Checkpoint families shared by the merge tests of the newer methods, coefficient fitting and mergekit agreement."""

from __future__ import annotations

import pytest
from merge_helpers import perturbed_copy


@pytest.fixture(scope="session")
def merge_family(tiny_model_dirs, tmp_path_factory):
    """A base (tiny Llama, tied embeddings) and three descendants (base + seeded noise of std 0.02)."""
    root = tmp_path_factory.mktemp("merge_family")
    base = tiny_model_dirs["llama"]
    children = [perturbed_copy(base, root / f"child{seed}", seed=seed, scale=0.02) for seed in (1, 2, 3)]
    return {"base": base, "children": children, "root": root}
