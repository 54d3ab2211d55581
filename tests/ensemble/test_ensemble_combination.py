"""The combination rules of causal LM ensembles (`ensemble/combination.py`) against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from hf_interop.ensemble import combine_log_probs, contrastive, maximum, mixture, product

# ----------------------------------------------------------------------------------------------------------------
# 1. Combination rules vs float64 references
# ----------------------------------------------------------------------------------------------------------------


def _random_log_probs(num_members=3, shape=(2, 5, 11), seed=0, with_minus_inf=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_members, *shape, generator=generator, dtype=torch.float64) * 2
    if with_minus_inf:
        logits[0, ..., 3] = -math.inf  # a token member 0 rules out
    return torch.log_softmax(logits, dim=-1)


def _naive(rule, log_probs, weights, alpha=0.1, beta=1.0):
    """Per-position, per-token loops in float64 over plain Python floats."""
    num_members, *batch_shape, vocab = log_probs.shape
    out = torch.empty(*batch_shape, vocab, dtype=torch.float64)
    flat_in = log_probs.reshape(num_members, -1, vocab)
    flat_out = out.view(-1, vocab)
    w = [value / sum(weights) for value in weights]
    for position in range(flat_in.shape[1]):
        probs = [[math.exp(flat_in[m, position, v].item()) for v in range(vocab)] for m in range(num_members)]
        if rule == "mixture":
            scores = [sum(w[m] * probs[m][v] for m in range(num_members)) for v in range(vocab)]
        elif rule == "product":
            scores = [
                math.prod(probs[m][v] ** w[m] if w[m] > 0 else 1.0 for m in range(num_members)) for v in range(vocab)
            ]
        elif rule == "max":
            scores = [max(w[m] * probs[m][v] for m in range(num_members)) for v in range(vocab)]
        else:  # contrastive: expert 0, amateur 1
            top = max(probs[0])
            scores = [
                math.exp(math.log(probs[0][v]) - beta * math.log(probs[1][v])) if probs[0][v] >= alpha * top else 0.0
                for v in range(vocab)
            ]
        total = sum(scores)
        for v in range(vocab):
            flat_out[position, v] = math.log(scores[v] / total) if scores[v] > 0 else -math.inf
    return out


@pytest.mark.parametrize("rule", ["mixture", "product", "max"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [0.0, 2.0, 1.0]])
def test_combination_rules_match_float64_reference(rule, weights):
    log_probs = _random_log_probs()
    expected = _naive(rule, log_probs, weights)
    for candidate in (log_probs, log_probs.float()):
        result = combine_log_probs(candidate, rule, weights)
        assert result.shape == log_probs.shape[1:]
        torch.testing.assert_close(
            result.double().exp(), expected.exp(), atol=1e-6 if candidate.dtype == torch.float32 else 1e-12, rtol=0
        )
        # normalised everywhere
        torch.testing.assert_close(
            result.double().exp().sum(-1), torch.ones(log_probs.shape[1:-1], dtype=torch.float64)
        )


@pytest.mark.parametrize("alpha,beta", [(0.1, 1.0), (0.5, 0.5), (1.0, 1.0)])
def test_contrastive_matches_reference_and_keeps_only_plausible_tokens(alpha, beta):
    log_probs = _random_log_probs(num_members=2, with_minus_inf=False)
    expected = _naive("contrastive", log_probs, [1.0, 1.0], alpha, beta)
    result = contrastive(log_probs[0], log_probs[1], alpha=alpha, amateur_weight=beta)
    torch.testing.assert_close(result.exp(), expected.exp(), atol=1e-12, rtol=0)
    implausible = log_probs[0] < log_probs[0].amax(-1, keepdim=True) + math.log(alpha)
    assert torch.all(result[implausible] == -math.inf)
    if alpha == 1.0:  # only the expert's argmax survives
        assert torch.equal(result.argmax(-1), log_probs[0].argmax(-1))


def test_rules_properties_identical_members_single_member_and_gradients():
    member = _random_log_probs(num_members=1, with_minus_inf=False)[0]
    identical = torch.stack([member, member, member])
    for rule in ("mixture", "product", "max"):
        torch.testing.assert_close(combine_log_probs(identical, rule, [0.2, 0.3, 0.5]), member)
        torch.testing.assert_close(combine_log_probs(member[None], rule), member)
    # a zero weight switches a member off exactly
    log_probs = _random_log_probs()
    for rule in ("mixture", "product", "max"):
        torch.testing.assert_close(combine_log_probs(log_probs, rule, [0.0, 1.0, 0.0]), log_probs[1])
    # gradients flow to weights (fitting) and inputs (distillation through an ensemble)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    inputs = _random_log_probs(shape=(2, 4), with_minus_inf=False).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, x: mixture(x, w), (weights, inputs))
    assert torch.autograd.gradcheck(lambda w, x: product(x, w), (weights, inputs))
    assert torch.autograd.gradcheck(lambda x: maximum(x, [1.0, 1.0, 1.0]), (inputs,))


@pytest.mark.parametrize(
    "weights,match",
    [
        ([1.0, 1.0], "has 2 entries"),
        ([1.0, -1.0, 1.0], "must be >= 0"),
        ([1.0, float("nan"), 1.0], "finite"),
        ([0.0, 0.0, 0.0], "all zero"),
    ],
)
def test_bad_weights_are_refused_by_the_rules(weights, match):
    with pytest.raises(ValueError, match=match):
        mixture(_random_log_probs(), weights)


def test_unknown_rule_and_bad_contrastive_settings():
    with pytest.raises(ValueError, match="use one of mixture, product, max, contrastive"):
        combine_log_probs(_random_log_probs(), "average")
    with pytest.raises(ValueError, match="exactly 2 members"):
        combine_log_probs(_random_log_probs(), "contrastive")
    with pytest.raises(ValueError, match=r"contrastive_alpha must be in \(0, 1\]"):
        contrastive(*_random_log_probs(2), alpha=0.0)
