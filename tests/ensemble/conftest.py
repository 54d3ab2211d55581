"""Fixtures the ensemble tests share: the corpus tokenizer, three tiny members that share it, an ensemble of them."""

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
