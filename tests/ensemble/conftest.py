"""Fixtures the ensemble tests share: the corpus tokenizer, three tiny members that share it, an ensemble of them,\nand a guard that fails a test which loads a member."""

from __future__ import annotations

import pytest
from helpers import build_tiny_causal_lm

from hf_interop.ensemble import EnsembleForCausalLM


@pytest.fixture(scope="module")
def tokenizer(corpus_tokenizer):
    return corpus_tokenizer


@pytest.fixture(scope="module")
def members(tokenizer):
    """Three tiny random members of different families sharing the corpus tokenizer."""
    return [
        build_tiny_causal_lm(family, len(tokenizer), seed=seed, tokenizer=tokenizer)
        for seed, family in enumerate(("llama", "qwen2", "gpt2"))
    ]


@pytest.fixture(scope="module")
def ensemble3(members, tokenizer):
    return EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], [0.5, 0.3, 0.2], "mixture")


@pytest.fixture
def forbid_loading(monkeypatch):
    """Any member load fails the test: the arguments must be refused before a member is loaded."""
    import hf_interop.loading

    def fail(*args, **kwargs):
        raise AssertionError("a member was loaded before the arguments were validated")

    monkeypatch.setattr(hf_interop.loading, "load_causal_lm", fail)
