"""Per-token divergences (`token_divergence`): every loss type against the naive float64 reference (values and
gradients), and their properties: zero for identical inputs, non-negative, JSD symmetry and endpoints, skew
endpoints, the temperature-squared switch."""

from __future__ import annotations

import math

import pytest
import torch
from loss_references import (
    LOSS_CASES,
    N_TOKENS,
    _case_id,
    assert_close64,
    make_inputs,
    reference_token_divergence,
)

from hf_interop.losses import (
    LOSS_TYPES,
    distillation_loss,
    token_divergence,
)

# ---------------------------------------------------------------------------------------------------------------
# dense form against the reference


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
def test_token_divergence_matches_reference_values_and_gradients(case):
    loss_type, kwargs = case
    student, teacher, _ = make_inputs()
    scale = kwargs.pop("scale_by_temperature_squared", None)
    ours = token_divergence(student, teacher, loss_type, scale_by_temperature_squared=scale, **kwargs)
    expected = reference_token_divergence(student, teacher, loss_type, scale=scale, **kwargs)
    assert ours.dtype == torch.float64 and ours.shape == (N_TOKENS,)
    assert_close64(ours, expected)
    weights = torch.rand(N_TOKENS, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours * weights).sum(), student)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), student)
    assert_close64(grad, expected_grad)


# ---------------------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_loss_and_zero_gradient_for_identical_inputs(loss_type):
    _, teacher, labels = make_inputs(seed=4)
    student = teacher.clone().requires_grad_()
    out = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=1.7, compute_ce_loss=False)
    assert abs(out.loss.item()) < 1e-12
    (grad,) = torch.autograd.grad(out.loss, student)
    assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_divergences_are_non_negative_even_for_peaked_distributions(loss_type):
    student, teacher, _ = make_inputs(seed=5, scale=30.0)
    values = token_divergence(student, teacher, loss_type, temperature=0.5)
    assert torch.isfinite(values).all()
    assert values.min().item() >= -1e-12
    assert values.max().item() > 0.1  # different inputs: clearly positive


def test_jsd_is_symmetric_at_half_and_not_elsewhere():
    student, teacher, _ = make_inputs(seed=6)
    student = student.detach()
    forward = token_divergence(student, teacher, "jsd", jsd_beta=0.5)
    swapped = token_divergence(teacher, student, "jsd", jsd_beta=0.5)
    torch.testing.assert_close(forward, swapped, rtol=1e-12, atol=1e-14)
    asymmetric = token_divergence(student, teacher, "jsd", jsd_beta=0.2)
    asymmetric_swapped = token_divergence(teacher, student, "jsd", jsd_beta=0.2)
    assert (asymmetric - asymmetric_swapped).abs().max() > 1e-4
    # the generalized JSD is bounded by log 2 at beta = 0.5 (with T^2 off)
    assert forward.max().item() <= math.log(2) + 1e-12


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_endpoints_equal_forward_and_reverse_kl_exactly(temperature):
    student, teacher, _ = make_inputs(seed=7)
    kwargs = {"temperature": temperature, "scale_by_temperature_squared": False}
    assert torch.equal(
        token_divergence(student, teacher, "jsd", jsd_beta=0.0, **kwargs),
        token_divergence(student, teacher, "forward_kl", **kwargs),
    )
    assert torch.equal(
        token_divergence(student, teacher, "jsd", jsd_beta=1.0, **kwargs),
        token_divergence(student, teacher, "reverse_kl", **kwargs),
    )
    # not a collapsing limit: the endpoint values are far from 0
    assert token_divergence(student, teacher, "jsd", jsd_beta=0.0, **kwargs).min() > 1e-3


def test_skew_kl_endpoints():
    student, teacher, _ = make_inputs(seed=8)
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_kl", skew_alpha=0.0), token_divergence(student, teacher, "forward_kl")
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_reverse_kl", skew_alpha=1.0),
        token_divergence(student, teacher, "reverse_kl"),
    )
    assert token_divergence(student, teacher, "skew_kl", skew_alpha=1.0).abs().max() == 0
    assert token_divergence(student, teacher, "skew_reverse_kl", skew_alpha=0.0).abs().max() == 0


def test_temperature_squared_switch():
    student, teacher, _ = make_inputs(seed=9)
    plain = token_divergence(student, teacher, "forward_kl", temperature=2.0, scale_by_temperature_squared=False)
    default = token_divergence(student, teacher, "forward_kl", temperature=2.0)
    torch.testing.assert_close(default, 4.0 * plain, rtol=1e-12, atol=0)
    reverse_default = token_divergence(student, teacher, "reverse_kl", temperature=2.0)
    reverse_plain = token_divergence(
        student, teacher, "reverse_kl", temperature=2.0, scale_by_temperature_squared=False
    )
    reverse_scaled = token_divergence(
        student, teacher, "reverse_kl", temperature=2.0, scale_by_temperature_squared=True
    )
    assert torch.equal(reverse_default, reverse_plain)
    torch.testing.assert_close(reverse_scaled, 4.0 * reverse_plain, rtol=1e-12, atol=0)
    # temperature divides BOTH models' logits
    torch.testing.assert_close(plain, token_divergence(student / 2, teacher / 2, "forward_kl"))
