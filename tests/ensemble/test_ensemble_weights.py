"""Learned member weights of causal LM ensembles (`ensemble/weights.py`), fit by held-out NLL."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_causal_lm

from hf_interop.ensemble import EnsembleForCausalLM


@pytest.fixture(scope="module")
def trained_member(tokenizer, packed_corpus):
    """A tiny Llama trained for 40 steps on the corpus: clearly better than random members."""
    model = build_tiny_causal_lm("llama", len(tokenizer), seed=7, tokenizer=tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = packed_corpus["train"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = train[torch.randint(len(train), (8,), generator=generator).tolist()]
        input_ids = torch.tensor(rows["input_ids"])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# 6. Learned weights
# ----------------------------------------------------------------------------------------------------------------


def test_learned_weights_lower_held_out_nll_than_uniform(members, trained_member, tokenizer, packed_corpus):
    from hf_interop import evaluate_perplexity, fit_ensemble_weights

    pairs = [(trained_member, tokenizer), (members[0], tokenizer), (members[1], tokenizer)]
    validation = packed_corpus["validation"].select(range(16))
    test = packed_corpus["test"].select(range(16))
    uniform = EnsembleForCausalLM.from_members(pairs)
    learned = EnsembleForCausalLM.from_members(pairs)
    fit = fit_ensemble_weights(learned, validation, max_steps=200)
    assert fit.nll < fit.uniform_nll and fit.nll <= fit.initial_nll
    assert fit.weights[0] > 0.8 and learned.config.weights == pytest.approx(fit.weights)
    # PackLLM-style initialisation already favours the member with the lowest perplexity
    assert fit.initial_weights[0] == max(fit.initial_weights)
    uniform_test = evaluate_perplexity(uniform, test, show_progress=False)["loss"]
    learned_test = evaluate_perplexity(learned, test, show_progress=False)["loss"]
    assert learned_test < uniform_test - 0.1
    # the product rule fits too (full distributions kept)
    fit_product = fit_ensemble_weights(learned, validation.select(range(8)), combination="product", max_steps=100)
    assert fit_product.nll < fit_product.uniform_nll


def test_fit_rejects_bad_arguments(ensemble3, packed_corpus):
    from hf_interop import fit_ensemble_weights

    validation = packed_corpus["validation"].select(range(4))
    with pytest.raises(ValueError, match="no member weights to fit"):
        fit_ensemble_weights(ensemble3, validation, combination="contrastive")
    with pytest.raises(ValueError, match="init has 2 entries"):
        fit_ensemble_weights(ensemble3, validation, init=[0.5, 0.5], apply=False)
    with pytest.raises(ValueError, match="max_cache_bytes"):
        fit_ensemble_weights(ensemble3, validation, combination="product", max_cache_bytes=1000, apply=False)
    with pytest.raises(ValueError, match="no 'input_ids'"):
        fit_ensemble_weights(ensemble3, validation.rename_column("input_ids", "ids"), apply=False)
