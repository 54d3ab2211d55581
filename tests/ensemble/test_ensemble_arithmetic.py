"""`combination="arithmetic"`: signed coefficients on member log-probabilities (proxy-tuning, DExperts), against a
float64 reference, through the ensemble model, and the degenerate coefficients refused before any member loads."""

from __future__ import annotations

import math

import pytest
import torch

from hf_interop.ensemble import EnsembleConfig, EnsembleForCausalLM, arithmetic, combine_log_probs, product


def _random_log_probs(num_members=3, shape=(2, 5, 11), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_members, *shape, generator=generator, dtype=torch.float64) * 2
    logits[0, ..., 3] = -math.inf  # a token a positive-coefficient member rules out
    logits[2, ..., 5] = -math.inf  # a token a negative-coefficient member rules out
    return torch.log_softmax(logits, dim=-1)


def _naive_arithmetic(log_probs, coefficients):
    """Loops over plain Python floats in float64: exp(sum_i c_i log p_i) / Z, with c normalised to sum to one."""
    num_members, *batch_shape, vocab = log_probs.shape
    total = sum(coefficients)
    c = [value / total for value in coefficients]
    floor = math.log(torch.finfo(torch.float64).tiny)
    flat = log_probs.reshape(num_members, -1, vocab)
    out = torch.empty(flat.shape[1], vocab, dtype=torch.float64)
    for position in range(flat.shape[1]):
        scores = []
        for token in range(vocab):
            score = 0.0
            for member in range(num_members):
                value = flat[member, position, token].item()
                if c[member] == 0:
                    continue
                if c[member] < 0:
                    value = max(value, floor)
                score += c[member] * value
            scores.append(score)
        finite = [score for score in scores if score != -math.inf]
        top = max(finite)
        norm = top + math.log(sum(math.exp(score - top) for score in finite))
        for token in range(vocab):
            out[position, token] = scores[token] - norm
    return out.reshape(*batch_shape, vocab)


@pytest.mark.parametrize(
    "coefficients",
    [[1.0, 1.0, -1.0], [1.0, 0.5, -0.5], [2.0, 2.0, -2.0], [0.3, 0.7, 0.0], [-0.5, 3.0, -1.0]],
    ids=["proxy-tuning", "dexperts", "scaled", "no-negative", "negative-base"],
)
def test_arithmetic_matches_float64_reference(coefficients):
    log_probs = _random_log_probs()
    expected = _naive_arithmetic(log_probs, coefficients)
    for candidate in (log_probs, log_probs.float()):
        result = combine_log_probs(candidate, "arithmetic", coefficients)
        assert result.shape == log_probs.shape[1:]
        assert torch.isfinite(result.exp()).all() and not torch.isnan(result).any()
        torch.testing.assert_close(
            result.double().exp(), expected.exp(), atol=1e-6 if candidate.dtype == torch.float32 else 1e-12, rtol=0
        )
        torch.testing.assert_close(
            result.double().exp().sum(-1), torch.ones(log_probs.shape[1:-1], dtype=torch.float64)
        )
        # the token the first (always positive) member rules out stays ruled out
        if coefficients[0] > 0:
            assert torch.all(result[..., 3] == -math.inf)


def test_arithmetic_is_proxy_tuning_on_raw_logits_and_product_without_negative_coefficients():
    generator = torch.Generator().manual_seed(1)
    large, tuned, base = torch.randn(3, 4, 50, generator=generator, dtype=torch.float64) * 3
    log_probs = torch.stack([torch.log_softmax(logits, -1) for logits in (large, tuned, base)])
    # proxy-tuning as its paper writes it: softmax over the raw logit sum (each row's log-normaliser cancels)
    torch.testing.assert_close(
        arithmetic(log_probs, [1.0, 1.0, -1.0]), torch.log_softmax(large + tuned - base, -1), atol=1e-12, rtol=0
    )
    # non-negative coefficients are the weighted product of experts
    torch.testing.assert_close(arithmetic(log_probs, [0.2, 0.3, 0.5]), product(log_probs, [0.2, 0.3, 0.5]))
    # gradients reach the coefficients and the inputs
    coefficients = torch.tensor([1.0, 0.7, -0.4], dtype=torch.float64, requires_grad=True)
    inputs = log_probs[:, :2, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, x: arithmetic(x, c), (coefficients, inputs))


@pytest.mark.parametrize(
    "coefficients,match",
    [
        (None, "needs signed"),
        ([-1.0, -0.5, -0.5], "no positive coefficient"),
        ([1.0, -1.0, 0.0], "sum to zero"),
        ([1.0, -2.0, 0.5], "sum to -0.5 < 0"),
        ([1.0, 1.0], "has 2 entries"),
        ([1.0, float("nan"), -1.0], "finite"),
        ([0.0, 0.0, 0.0], "no positive coefficient"),
    ],
)
def test_degenerate_coefficients_are_refused(coefficients, match):
    with pytest.raises(ValueError, match=match):
        combine_log_probs(_random_log_probs(), "arithmetic", coefficients)
    with pytest.raises(ValueError, match=match):
        EnsembleConfig(members=["a/b", "c/d", "e/f"], combination="arithmetic", weights=coefficients)


def test_signed_weights_stay_refused_by_the_other_rules():
    with pytest.raises(ValueError, match="must be >= 0"):
        EnsembleConfig(members=["a/b", "c/d", "e/f"], combination="product", weights=[1.0, 1.0, -1.0])


def test_from_members_refuses_degenerate_coefficients_before_loading(tiny_model_dirs, forbid_loading):
    members = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"])]
    with pytest.raises(ValueError, match="sum to zero"):
        EnsembleForCausalLM.from_members(members, [1.0, -1.0], combination="arithmetic")


def test_arithmetic_ensemble_forward_and_generate(members, tokenizer):
    coefficients = [1.0, 0.8, -0.8]
    ensemble = EnsembleForCausalLM.from_members([(m, tokenizer) for m in members], coefficients, "arithmetic")
    inputs = tokenizer(["The with statement is used to"], return_tensors="pt")
    with torch.no_grad():
        member_log_probs = torch.stack(
            [torch.log_softmax(m(**inputs).logits.double()[..., : len(tokenizer)], -1) for m in members]
        )
        output = ensemble(**inputs)
    expected = _naive_arithmetic(member_log_probs[:, 0, -3:], coefficients)
    torch.testing.assert_close(output.logits[0, -3:].double().exp(), expected.exp(), atol=1e-5, rtol=0)
    generated = ensemble.generate(**inputs, max_new_tokens=6, do_sample=False)
    # greedy: each new token is the argmax of the arithmetic combination given the text before it
    with torch.no_grad():
        step_log_probs = ensemble(input_ids=generated[:, :-1]).logits[0, inputs.input_ids.shape[1] - 1 :]
    assert torch.equal(step_log_probs.argmax(-1), generated[0, inputs.input_ids.shape[1] :])
    # signed weights go through set_member_weights too (normalised by their sum), the others' checks stay
    ensemble.set_member_weights([2.0, 1.0, -1.0])
    assert ensemble.config.weights == [1.0, 0.5, -0.5]
    with pytest.raises(ValueError, match="sum to zero"):
        ensemble.set_member_weights([1.0, 1.0, -2.0])
