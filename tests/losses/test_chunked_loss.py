"""Distillation losses: every divergence against a naive float64 reference, properties, masking, normalisation,
the chunked and sparse forms against the dense one, output heads of real model classes, bad inputs."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hf_interop import logging_utils, losses
from hf_interop.losses import (
    LOSS_TYPES,
    DistillationLossOutput,
    distillation_loss,
    token_divergence,
)

N_TOKENS, VOCAB, HIDDEN = 37, 101, 16
DIVERGENCE_TYPES = tuple(t for t in LOSS_TYPES if t != "mse")


# ---------------------------------------------------------------------------------------------------------------
# naive float64 reference: explicit probabilities, one formula per loss type, loops over tokens


def reference_token_divergence(student, teacher, loss_type, temperature=1.0, jsd_beta=0.5, skew_alpha=0.1, scale=None):
    s = student.double() / temperature
    t = teacher.double() / temperature
    p_s = torch.softmax(s, -1)
    p_t = torch.softmax(t, -1)

    def kl(p, q):
        return (p * (torch.log(p) - torch.log(q))).sum(-1)

    if loss_type == "forward_kl" or (loss_type == "jsd" and jsd_beta == 0):
        value = kl(p_t, p_s)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1):
        value = kl(p_s, p_t)
    elif loss_type == "jsd":
        m = jsd_beta * p_t + (1 - jsd_beta) * p_s
        value = jsd_beta * kl(p_t, m) + (1 - jsd_beta) * kl(p_s, m)
    elif loss_type == "skew_kl":
        value = kl(p_t, skew_alpha * p_t + (1 - skew_alpha) * p_s)
    elif loss_type == "skew_reverse_kl":
        value = kl(p_s, (1 - skew_alpha) * p_s + skew_alpha * p_t)
    elif loss_type == "tvd":
        value = 0.5 * (p_t - p_s).abs().sum(-1)
    elif loss_type == "mse":
        value = ((s - t) ** 2).mean(-1)
    else:
        raise AssertionError(loss_type)
    if scale is None:
        scale = loss_type == "forward_kl"
    return value * (temperature**2 if scale else 1.0)


def reference_loss(student, teacher, labels, loss_type, kd_ratio=1.0, normalizer=None, vocab=None, **kwargs):
    """Loop over tokens; returns (loss, kd_loss, ce_loss) in float64."""
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.reshape(-1, teacher.shape[-1])
    labels = labels.reshape(-1)
    vocab = vocab or student.shape[-1]
    kd_sum = student.new_zeros((), dtype=torch.float64)
    ce_sum = student.new_zeros((), dtype=torch.float64)
    count = 0
    for i in range(labels.numel()):
        if labels[i] == -100:
            continue
        count += 1
        kd_sum = kd_sum + reference_token_divergence(student[i, :vocab], teacher[i, :vocab], loss_type, **kwargs)
        ce_sum = ce_sum - torch.log(torch.softmax(student[i].double(), -1)[labels[i]])
    normalizer = normalizer if normalizer is not None else count
    kd, ce = kd_sum / normalizer, ce_sum / normalizer
    return kd_ratio * kd + (1 - kd_ratio) * ce, kd, ce


def make_inputs(seed=0, n=N_TOKENS, vocab=VOCAB, teacher_vocab=None, dtype=torch.float64, scale=3.0, ignore=0.25):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=generator, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(n, teacher_vocab or vocab, generator=generator, dtype=dtype) * scale
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignore] = -100
    return student, teacher, labels


def assert_close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-10)


LOSS_CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {"temperature": 0.7}),
    ("jsd", {}),
    ("jsd", {"jsd_beta": 0.2, "temperature": 1.5}),
    ("jsd", {"jsd_beta": 0.0}),
    ("jsd", {"jsd_beta": 1.0}),
    ("skew_kl", {"skew_alpha": 0.1}),
    ("skew_kl", {"skew_alpha": 0.5, "temperature": 2.0}),
    ("skew_reverse_kl", {"skew_alpha": 0.3}),
    ("tvd", {}),
    ("tvd", {"temperature": 2.0}),
    ("mse", {}),
    ("mse", {"temperature": 2.0, "scale_by_temperature_squared": True}),
]


def _case_id(case):
    loss_type, kwargs = case
    return loss_type + "".join(f"-{k}={v}" for k, v in kwargs.items())


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


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
def test_distillation_loss_matches_reference_with_ce_masking_and_normalizer(case):
    loss_type, kwargs = case
    student, teacher, labels = make_inputs(seed=1)
    scale = kwargs.pop("scale_by_temperature_squared", None)
    out = distillation_loss(
        student.view(1, N_TOKENS, VOCAB),
        teacher.view(1, N_TOKENS, VOCAB),
        labels.view(1, N_TOKENS),
        loss_type=loss_type,
        kd_ratio=0.7,
        num_items_in_batch=50,
        scale_by_temperature_squared=scale,
        **kwargs,
    )
    loss, kd, ce = reference_loss(
        student, teacher, labels, loss_type, kd_ratio=0.7, normalizer=50, scale=scale, **kwargs
    )
    assert isinstance(out, DistillationLossOutput)
    assert out.num_valid_tokens == int((labels != -100).sum())
    assert_close64(out.loss, loss)
    assert_close64(out.kd_loss, kd)
    assert_close64(out.ce_loss, ce)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(loss, student)
    assert_close64(grad, expected_grad)
    assert torch.all(grad[labels == -100] == 0)


def test_float32_and_bfloat16_inputs_are_computed_in_float32():
    student, teacher, labels = make_inputs(seed=2)
    expected = reference_loss(student, teacher, labels, "forward_kl")[0]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = distillation_loss(student.detach().to(dtype), teacher.to(dtype), labels)
        assert out.loss.dtype == torch.float32
        assert abs(out.loss.item() - expected.item()) <= tolerance * expected.item()


def test_statistics_match_reference():
    student, teacher, labels = make_inputs(seed=3)
    out = distillation_loss(student, teacher, labels)
    valid = labels != -100
    s, t = student.detach()[valid], teacher[valid]
    assert out.top1_agreement == pytest.approx((s.argmax(-1) == t.argmax(-1)).double().mean().item())
    entropy = lambda x: -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1).mean().item()  # noqa: E731
    assert out.teacher_entropy == pytest.approx(entropy(t), rel=1e-9)
    assert out.student_entropy == pytest.approx(entropy(s), rel=1e-9)
    identical = distillation_loss(teacher.clone().requires_grad_(), teacher, labels)
    assert identical.top1_agreement == 1.0


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


# ---------------------------------------------------------------------------------------------------------------
# masking and normalisation


def test_ignored_positions_do_not_matter_even_if_teacher_is_nan_there():
    student, teacher, labels = make_inputs(seed=10, ignore=0.4)
    reference = distillation_loss(student, teacher, labels, kd_ratio=0.5)
    changed_student = student.detach().clone()
    changed_teacher = teacher.clone()
    ignored = labels == -100
    changed_student[ignored] = torch.randn_like(changed_student[ignored]) * 10
    changed_teacher[ignored] = float("nan")
    changed_student.requires_grad_()
    changed = distillation_loss(changed_student, changed_teacher, labels, kd_ratio=0.5)
    assert torch.equal(changed.loss, reference.loss)
    (grad,) = torch.autograd.grad(changed.loss, changed_student)
    assert torch.all(grad[ignored] == 0)


def test_gradient_accumulation_and_process_split_give_the_same_loss_and_gradient():
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(8, 9, VOCAB, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 9, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (8, 9), generator=generator)
    labels[torch.rand(8, 9, generator=generator) < 0.3] = -100  # uneven valid counts per micro-batch
    labels[3] = -100  # one whole sequence padded
    total_valid = int((labels != -100).sum())
    full = distillation_loss(student, teacher, labels, kd_ratio=0.6)
    (full_grad,) = torch.autograd.grad(full.loss, student)
    accumulated = 0.0
    for i in range(0, 8, 2):
        part = distillation_loss(
            student[i : i + 2], teacher[i : i + 2], labels[i : i + 2], kd_ratio=0.6,
            num_items_in_batch=torch.tensor(total_valid),
        )  # fmt: skip
        accumulated = accumulated + part.loss
    (accumulated_grad,) = torch.autograd.grad(accumulated, student)
    assert_close64(accumulated, full.loss)
    assert_close64(accumulated_grad, full_grad)


def test_all_labels_ignored_gives_differentiable_zero_and_a_warning(caplog):
    student, teacher, labels = make_inputs(seed=12)
    labels[:] = -100
    logging_utils._warned.discard(losses._ALL_IGNORED_WARNING)
    with caplog.at_level(logging.WARNING, logger="hf_interop.losses"):
        out = distillation_loss(student, teacher, labels, kd_ratio=0.5)
    assert "ignore_index" in caplog.text
    assert out.loss.item() == 0.0 and out.kd_loss.item() == 0.0 and out.ce_loss.item() == 0.0
    assert out.num_valid_tokens == 0 and out.top1_agreement == 0.0
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.all(grad == 0)
    with_global = distillation_loss(student, teacher, labels, num_items_in_batch=10)
    assert with_global.loss.item() == 0.0 and not torch.isnan(with_global.loss)


def test_custom_ignore_index():
    student, teacher, labels = make_inputs(seed=13)
    relabelled = labels.clone()
    relabelled[labels == -100] = -1
    torch.testing.assert_close(
        distillation_loss(student, teacher, relabelled, ignore_index=-1, kd_ratio=0.5).loss,
        distillation_loss(student, teacher, labels, kd_ratio=0.5).loss,
    )


def test_shared_vocab_size_compares_the_first_columns_and_ce_uses_the_full_student_vocab():
    student, teacher, labels = make_inputs(seed=14, vocab=VOCAB, teacher_vocab=VOCAB + 27)
    out = distillation_loss(student, teacher, labels, shared_vocab_size=96, kd_ratio=0.5, loss_type="jsd")
    loss, _, _ = reference_loss(student, teacher, labels, "jsd", kd_ratio=0.5, vocab=96)
    assert_close64(out.loss, loss)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(loss, student)
    assert_close64(grad, expected_grad)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "kl"}, "loss_type='kl'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"jsd_beta": 1.5}, "jsd_beta=1.5"),
        ({"skew_alpha": -0.1}, "skew_alpha=-0.1"),
        ({"kd_ratio": 2.0}, "kd_ratio=2.0"),
        ({"kd_ratio": 0.5, "compute_ce_loss": False}, "compute_ce_loss=True"),
        ({"num_items_in_batch": -3}, "num_items_in_batch=-3"),
        ({"shared_vocab_size": VOCAB + 1}, f"shared_vocab_size={VOCAB + 1}"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    student, teacher, labels = make_inputs(seed=15)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        distillation_loss(student, teacher, labels, **kwargs)


def test_bad_shapes_and_vocab_mismatch_raise_clear_errors():
    student, teacher, labels = make_inputs(seed=16, teacher_vocab=VOCAB + 3)
    with pytest.raises(
        ValueError, match=rf"student vocab size {VOCAB} != teacher vocab size {VOCAB + 3}.*shared_vocab"
    ):
        distillation_loss(student, teacher, labels)
    student, teacher, labels = make_inputs(seed=16)
    with pytest.raises(ValueError, match="labels has shape"):
        distillation_loss(student, teacher, labels[:-1])
    with pytest.raises(ValueError, match="differ before the vocab dim"):
        distillation_loss(student, teacher[:-1], labels)
    bad_labels = labels.clone()
    bad_labels[0] = VOCAB + 5
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        distillation_loss(student, teacher, bad_labels)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_teacher_logits_on_valid_tokens_raise(bad_value):
    student, teacher, labels = make_inputs(seed=17)
    teacher = teacher.clone()
    teacher[int((labels != -100).nonzero()[0]), 3] = bad_value
    with pytest.raises(ValueError, match="teacher_logits hold 1 non-finite"):
        distillation_loss(student, teacher, labels)


# ---------------------------------------------------------------------------------------------------------------
# output heads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_output_logits_fn_reproduces_model_logits_and_reaches_the_head_weight(family):
    from helpers import build_tiny_causal_lm

    model = build_tiny_causal_lm(family, vocab_size=96)
    input_ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids, output_hidden_states=True)
    head = losses.output_logits_fn(model)
    torch.testing.assert_close(head(outputs.hidden_states[-1]), outputs.logits, rtol=1e-5, atol=1e-5)
    head(outputs.hidden_states[-1].detach()).sum().backward()
    weight = model.get_output_embeddings().weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    if model.config.tie_word_embeddings:
        assert model.get_input_embeddings().weight.grad is weight.grad


@pytest.mark.parametrize(
    "config_name, overrides",
    [
        ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 0.5}),
        ("Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 0.5}),
        ("CohereConfig", {"logit_scale": 0.3}),
        ("GraniteConfig", {"logits_scaling": 4.0}),
    ],
)
def test_output_logits_fn_applies_softcapping_and_logit_scales(config_name, overrides):
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids, output_hidden_states=True)
    hidden = outputs.hidden_states[-1]
    head = losses.output_logits_fn(model)
    torch.testing.assert_close(head(hidden), outputs.logits, rtol=1e-5, atol=1e-6)
    # the post-processing matters: the plain lm_head gives different logits
    assert (model.get_output_embeddings()(hidden) - outputs.logits).abs().max() > 1e-3
    if "final_logit_softcapping" in overrides:
        assert head(hidden * 100).abs().max() <= overrides["final_logit_softcapping"]


def test_output_logits_fn_unwraps_peft_models_and_rejects_models_without_a_head():
    from helpers import build_tiny_causal_lm
    from peft import LoraConfig, get_peft_model

    model = build_tiny_causal_lm("qwen2", vocab_size=96)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    head = losses.output_logits_fn(peft_model)
    assert head.output_embeddings is model.get_output_embeddings()

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="teacher_logits"):
        losses.output_logits_fn(NoHead())


# ---------------------------------------------------------------------------------------------------------------
# chunked form against the dense form


def make_hidden_inputs(seed=0, n=N_TOKENS, hidden=HIDDEN, vocab=VOCAB, teacher_vocab=None, ignore=0.25):
    generator = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    teacher_head = torch.nn.Linear(hidden + 3, teacher_vocab or vocab, bias=False, dtype=torch.float64)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(student_head.weight.shape, generator=generator, dtype=torch.float64))
        teacher_head.weight.copy_(torch.randn(teacher_head.weight.shape, generator=generator, dtype=torch.float64))
    student_hidden = torch.randn(n, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(n, hidden + 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignore] = -100
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def dense_reference_and_grads(student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs):
    out = distillation_loss(student_head(student_hidden), teacher_head(teacher_hidden).detach(), labels, **kwargs)
    grads = torch.autograd.grad(out.loss, [student_hidden, student_head.weight])
    return out, grads


def assert_same_output(chunked, dense):
    assert_close64(chunked.loss, dense.loss.detach())
    assert_close64(chunked.kd_loss, dense.kd_loss.detach())
    if dense.ce_loss is None:
        assert chunked.ce_loss is None
    else:
        assert_close64(chunked.ce_loss, dense.ce_loss.detach())
    assert chunked.num_valid_tokens == dense.num_valid_tokens
    assert chunked.top1_agreement == pytest.approx(dense.top1_agreement)
    assert chunked.teacher_entropy == pytest.approx(dense.teacher_entropy, rel=1e-9)
    assert chunked.student_entropy == pytest.approx(dense.student_entropy, rel=1e-9)


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
def test_chunked_equals_dense_values_and_gradients_for_every_loss_type(case):
    loss_type, kwargs = case
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=20)
    kwargs = {"loss_type": loss_type, "kd_ratio": 0.75, "num_items_in_batch": 40, **kwargs}
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs
    )
    chunked = losses.chunked_distillation_loss(
        student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
        chunk_size=7, **kwargs,
    )  # fmt: skip
    assert_same_output(chunked, dense)
    grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert_close64(grad, expected)


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 1024])
@pytest.mark.parametrize("fused_backward", [True, False])
def test_chunked_equals_dense_for_odd_chunk_sizes_both_backward_modes_and_3d_inputs(chunk_size, fused_backward):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=21, n=36)
    kwargs = {"loss_type": "jsd", "jsd_beta": 0.3, "temperature": 1.5, "kd_ratio": 0.5}
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs
    )
    chunked = losses.chunked_distillation_loss(
        student_hidden.view(4, 9, HIDDEN), student_head, labels.view(4, 9), teacher_hidden=teacher_hidden.view(4, 9, -1),
        teacher_head=teacher_head, chunk_size=chunk_size, fused_backward=fused_backward, **kwargs,
    )  # fmt: skip
    assert_same_output(chunked, dense)
    grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert_close64(grad, expected)


def test_chunked_with_precomputed_teacher_logits_and_shared_vocab_size():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(
        seed=22, teacher_vocab=VOCAB + 11
    )
    kwargs = {"loss_type": "forward_kl", "temperature": 2.0, "kd_ratio": 0.4, "shared_vocab_size": VOCAB - 5}
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs
    )
    teacher_logits = teacher_head(teacher_hidden).detach()
    for teacher_kwargs in (
        {"teacher_logits": teacher_logits},
        {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head},
    ):
        chunked = losses.chunked_distillation_loss(
            student_hidden, student_head, labels, chunk_size=8, **teacher_kwargs, **kwargs
        )
        assert_same_output(chunked, dense)
        grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
        for grad, expected in zip(grads, dense_grads, strict=True):
            assert_close64(grad, expected)
    assert teacher_head.weight.grad is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_gradients_reach_tied_and_untied_heads_of_real_models(family):
    from helpers import build_tiny_causal_lm

    vocab = 96
    input_ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = input_ids[:, 1:].clone()
    labels[0, :4] = -100
    teacher = build_tiny_causal_lm(family, vocab_size=vocab, seed=7)
    with torch.no_grad():
        teacher_hidden = teacher(input_ids, output_hidden_states=True).hidden_states[-1][:, :-1]

    def gradients(use_chunked: bool):
        student = build_tiny_causal_lm(family, vocab_size=vocab, seed=3).train()
        outputs = student(input_ids, output_hidden_states=True)
        if use_chunked:
            out = losses.chunked_distillation_loss(
                outputs.hidden_states[-1][:, :-1], losses.output_logits_fn(student), labels,
                teacher_hidden=teacher_hidden, teacher_head=losses.output_logits_fn(teacher), chunk_size=5, kd_ratio=0.5,
            )  # fmt: skip
        else:
            out = distillation_loss(outputs.logits[:, :-1], teacher.lm_head(teacher_hidden), labels, kd_ratio=0.5)
        out.loss.backward()
        return out.loss.item(), {name: p.grad.clone() for name, p in student.named_parameters()}, student

    dense_loss, dense_grads, _ = gradients(False)
    chunked_loss, chunked_grads, student = gradients(True)
    assert chunked_loss == pytest.approx(dense_loss, rel=1e-5)
    assert dense_grads.keys() == chunked_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(chunked_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    head_weight = student.get_output_embeddings().weight
    assert head_weight.grad.abs().sum() > 0
    assert (head_weight is student.get_input_embeddings().weight) == (family == "llama")


def test_chunked_loss_without_grad_and_in_low_precision():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=23)
    dense, _ = dense_reference_and_grads(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    with torch.no_grad():
        evaluated = losses.chunked_distillation_loss(
            student_hidden,
            student_head,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            chunk_size=8,
        )
    assert_close64(evaluated.loss, dense.loss.detach())
    bf16_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(torch.bfloat16)
    bf16_head.weight.data.copy_(student_head.weight.data)
    hidden = student_hidden.detach().to(torch.bfloat16).requires_grad_()
    out = losses.chunked_distillation_loss(
        hidden,
        bf16_head,
        labels,
        teacher_hidden=teacher_hidden.float(),
        teacher_head=teacher_head.float(),
        chunk_size=8,
    )
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(dense.loss.item(), rel=0.05)
    out.loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and bf16_head.weight.grad.dtype == torch.bfloat16


def test_chunked_all_ignored_and_bad_inputs():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=24)
    teacher = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
    all_ignored = torch.full_like(labels, -100)
    out = losses.chunked_distillation_loss(student_hidden, student_head, all_ignored, **teacher)
    assert out.loss.item() == 0.0 and out.num_valid_tokens == 0
    out.loss.backward()
    assert torch.all(student_hidden.grad == 0) and torch.all(student_head.weight.grad == 0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        losses.chunked_distillation_loss(student_hidden, student_head, labels, chunk_size=0, **teacher)
    with pytest.raises(ValueError, match="teacher is missing"):
        losses.chunked_distillation_loss(student_hidden, student_head, labels, teacher_hidden=teacher_hidden)
    with pytest.raises(ValueError, match="not both"):
        losses.chunked_distillation_loss(
            student_hidden, student_head, labels, teacher_logits=torch.zeros(N_TOKENS, VOCAB), **teacher
        )
    with pytest.raises(ValueError, match="loss_type='kl'"):
        losses.chunked_distillation_loss(student_hidden, student_head, labels, loss_type="kl", **teacher)
    bad_teacher = teacher_head(teacher_hidden).detach()
    bad_teacher[int((labels != -100).nonzero()[-1])] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits hold non-finite"):
        losses.chunked_distillation_loss(student_hidden, student_head, labels, teacher_logits=bad_teacher)
    with pytest.raises(ValueError, match="student vocab size"):
        losses.chunked_distillation_loss(
            student_hidden, student_head, labels, teacher_logits=torch.zeros(N_TOKENS, VOCAB + 1)
        )


# ---------------------------------------------------------------------------------------------------------------
# sparse forms (cached top-k + tail)

SPARSE_CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0, "cache_temperature": 1.0}),
    ("reverse_kl", {"temperature": 0.8, "cache_temperature": 1.3}),
    ("jsd", {}),
    ("jsd", {"jsd_beta": 0.1, "temperature": 1.5, "cache_temperature": 1.5}),
    ("jsd", {"jsd_beta": 1.0}),
    ("tvd", {"temperature": 2.0}),
]


def make_cache(teacher_logits, top_k, cache_temperature=1.0, dtype=torch.float64):
    log_probs = torch.log_softmax(teacher_logits.double() / cache_temperature, -1)
    topk_logprobs, topk_ids = log_probs.topk(top_k, dim=-1)
    tail = torch.log1p(-topk_logprobs.exp().sum(-1).clamp(max=1.0))
    return topk_ids, topk_logprobs.to(dtype), tail.to(dtype)


def reference_sparse_loss(
    student, ids, topk_logprobs, tail, labels, loss_type, temperature=1.0, cache_temperature=1.0, jsd_beta=0.5,
    kd_ratio=1.0, vocab_size=None,
):  # fmt: skip
    """Per token, in probability space: k+1 buckets, uniform-tail re-tempering, explicit divergence formulas."""
    vocab_size = vocab_size or student.shape[-1]
    kd_sum = student.new_zeros((), dtype=torch.float64)
    ce_sum = student.new_zeros((), dtype=torch.float64)
    count = 0
    ratio = cache_temperature / temperature
    for i in range(labels.numel()):
        if labels[i] == -100:
            continue
        count += 1
        p_s_full = torch.softmax(student[i].double() / temperature, -1)
        q_top = p_s_full[ids[i]]
        q = torch.cat([q_top, (1 - q_top.sum()).view(1)])
        top, tail_mass = topk_logprobs[i].double().exp(), tail[i].double().exp()
        tail_tokens = vocab_size - ids.shape[-1]
        if tail_tokens == 0:
            weights = torch.cat([top, torch.zeros(1, dtype=torch.float64)])
        else:
            weights = torch.cat([top**ratio, (tail_tokens * (tail_mass / tail_tokens) ** ratio).view(1)])
        p = weights / weights.sum()

        def kl(a, b):
            mask = a > 0
            return (a[mask] * (torch.log(a[mask]) - torch.log(b[mask]))).sum()

        if loss_type == "forward_kl" or (loss_type == "jsd" and jsd_beta == 0):
            value = kl(p, q)
        elif loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1):
            value = kl(q, p)
        elif loss_type == "jsd":
            m = jsd_beta * p + (1 - jsd_beta) * q
            value = jsd_beta * kl(p, m) + (1 - jsd_beta) * kl(q, m)
        else:
            value = 0.5 * (p - q).abs().sum()
        kd_sum = kd_sum + value * (temperature**2 if loss_type == "forward_kl" else 1.0)
        ce_sum = ce_sum - torch.log_softmax(student[i].double(), -1)[labels[i]]
    return kd_ratio * kd_sum / count + (1 - kd_ratio) * ce_sum / count


@pytest.mark.parametrize("case", SPARSE_CASES, ids=_case_id)
def test_sparse_loss_matches_float64_reference_values_and_gradients(case):
    loss_type, kwargs = case
    student, teacher, labels = make_inputs(seed=30)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=8, cache_temperature=kwargs.get("cache_temperature", 1.0))
    out = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, loss_type=loss_type, kd_ratio=0.8, **kwargs
    )
    expected = reference_sparse_loss(student, ids, topk_logprobs, tail, labels, loss_type, kd_ratio=0.8, **kwargs)
    assert_close64(out.loss, expected)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert_close64(grad, expected_grad)


@pytest.mark.parametrize("loss_type", losses.SPARSE_LOSS_TYPES)
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 1.0), (0.7, 1.6)])
def test_sparse_loss_with_the_whole_vocabulary_equals_the_dense_loss(loss_type, temperatures):
    temperature, cache_temperature = temperatures
    student, teacher, labels = make_inputs(seed=31)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=VOCAB, cache_temperature=cache_temperature)
    sparse = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, loss_type=loss_type, temperature=temperature,
        cache_temperature=cache_temperature, kd_ratio=0.6,
    )  # fmt: skip
    dense = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=temperature, kd_ratio=0.6)
    assert_close64(sparse.loss, dense.loss)
    assert sparse.top1_agreement == dense.top1_agreement
    grads = [torch.autograd.grad(out.loss, student)[0] for out in (sparse, dense)]
    assert_close64(grads[0], grads[1])


def test_retempering_is_exact_when_the_tail_is_uniform():
    student, teacher, labels = make_inputs(seed=32)
    teacher = teacher.clone()
    top_k = 6
    order = teacher.argsort(-1, descending=True)
    tail_positions = order[:, top_k:]
    teacher.scatter_(-1, tail_positions, -2.0)  # every token outside the top-k has the same logit
    ids, topk_logprobs, tail = make_cache(teacher, top_k=top_k, cache_temperature=1.0)
    for temperature in (0.5, 2.0):
        sparse = losses.sparse_distillation_loss(
            student, ids, topk_logprobs, tail, labels, temperature=temperature, loss_type="reverse_kl"
        )
        # the dense teacher at `temperature`, read through the same k+1 buckets
        tempered = torch.log_softmax(teacher / temperature, -1)
        top = tempered.gather(-1, ids)
        rebuilt = losses.sparse_distillation_loss(
            student, ids, top, torch.log1p(-top.exp().sum(-1)), labels, temperature=temperature,
            cache_temperature=temperature, loss_type="reverse_kl",
        )  # fmt: skip
        assert_close64(sparse.loss, rebuilt.loss)


@pytest.mark.parametrize("loss_type", losses.SPARSE_LOSS_TYPES)
def test_sparse_loss_grows_towards_the_dense_loss_as_k_grows(loss_type):
    # bucketing is a coarse-graining, so every f-divergence can only shrink (data processing inequality),
    # per token, and refining the buckets (larger k) brings it back up to the dense value
    student, teacher, labels = make_inputs(seed=33)
    student = student.detach()
    dense = token_divergence(student, teacher, loss_type)
    previous = torch.zeros_like(dense)
    labels = torch.zeros(N_TOKENS, dtype=torch.long)
    for top_k in (1, 4, 16, 50, 100, VOCAB):
        ids, topk_logprobs, tail = make_cache(teacher, top_k=top_k)
        per_token = torch.stack(
            [
                losses.sparse_distillation_loss(
                    student[i : i + 1], ids[i : i + 1], topk_logprobs[i : i + 1], tail[i : i + 1], labels[i : i + 1],
                    loss_type=loss_type,
                ).kd_loss
                for i in range(N_TOKENS)
            ]
        )  # fmt: skip
        assert torch.all(per_token <= dense * (1 + 1e-9) + 1e-12)
        assert torch.all(per_token >= previous * (1 - 1e-9) - 1e-12)
        previous = per_token
    assert_close64(previous, dense)


@pytest.mark.parametrize("top_k", [9, VOCAB])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=_case_id)
def test_chunked_sparse_equals_sparse_values_and_gradients(case, top_k):
    loss_type, kwargs = case
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=34)
    ids, topk_logprobs, tail = make_cache(teacher_head(teacher_hidden).detach(), top_k=top_k)
    common = {"loss_type": loss_type, "kd_ratio": 0.7, "num_items_in_batch": 33, **kwargs}
    dense = losses.sparse_distillation_loss(student_head(student_hidden), ids, topk_logprobs, tail, labels, **common)
    dense_grads = torch.autograd.grad(dense.loss, [student_hidden, student_head.weight])
    for chunk_size, fused_backward in ((6, True), (11, False)):
        chunked = losses.chunked_sparse_distillation_loss(
            student_hidden.view(1, N_TOKENS, HIDDEN), student_head, ids.view(1, N_TOKENS, -1),
            topk_logprobs.view(1, N_TOKENS, -1), tail.view(1, N_TOKENS), labels.view(1, N_TOKENS),
            chunk_size=chunk_size, fused_backward=fused_backward, **common,
        )  # fmt: skip
        assert_same_output(chunked, dense)
        grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
        for grad, expected in zip(grads, dense_grads, strict=True):
            assert_close64(grad, expected)


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_chunked_sparse_in_float32_keeps_a_student_tail_that_underflows(loss_type):
    # The float32 chunk sums the student's probabilities outside the teacher's ids; where they are subnormal (log-
    # probability below about -87) or underflow to 0, that sum is imprecise or 0 (log = -inf), and those rows must
    # fall back to a log-sum-exp. Reference: the autograd sparse loss in float64.
    student, teacher, labels = make_inputs(seed=37, ignore=0.0)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=11)
    logits = student.detach().clone()
    outside = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, ids, False)
    for row, level in ((0, -95.0), (1, -200.0), (2, -1e4), (3, -95.0)):  # subnormal, underflowed, far beyond
        logits[row] = torch.where(outside[row], level + logits[row] * 0.1, logits[row])
    reference_logits = logits.clone().requires_grad_()
    expected = losses.sparse_distillation_loss(reference_logits, ids, topk_logprobs, tail, labels, loss_type=loss_type)
    (expected_grad,) = torch.autograd.grad(expected.loss, reference_logits)
    assert torch.isfinite(expected.loss)

    hidden = logits.float().requires_grad_()
    head = torch.nn.Linear(VOCAB, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(VOCAB))
    out = losses.chunked_sparse_distillation_loss(
        hidden, head, ids, topk_logprobs.float(), tail.float(), labels, loss_type=loss_type, chunk_size=16
    )
    (grad,) = torch.autograd.grad(out.loss, hidden)
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "scales", [(100.0, 100.0), (300.0, 3.0), (3.0, 300.0)], ids=["both-peaked", "student", "teacher"]
)
@pytest.mark.parametrize("loss_type", DIVERGENCE_TYPES)
def test_chunked_float32_losses_match_float64_at_extreme_logit_scales(loss_type, scales):
    # Very confident models put probabilities below float32's range on most of the vocabulary: the chunked closed
    # forms (dense and, where defined, sparse) must stay finite and match the float64 autograd losses there.
    generator = torch.Generator().manual_seed(38)
    student = torch.randn(N_TOKENS, VOCAB, generator=generator, dtype=torch.float64) * scales[0]
    teacher = torch.randn(N_TOKENS, VOCAB, generator=generator, dtype=torch.float64) * scales[1]
    labels = torch.randint(0, VOCAB, (N_TOKENS,), generator=generator)
    identity = torch.nn.Linear(VOCAB, VOCAB, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(VOCAB))
    ids, topk_logprobs, tail = make_cache(teacher, top_k=9)
    cases = [
        (
            lambda logits: distillation_loss(logits, teacher, labels, loss_type=loss_type, kd_ratio=0.8),
            lambda hidden: losses.chunked_distillation_loss(
                hidden, identity, labels, teacher_logits=teacher.float(), loss_type=loss_type, kd_ratio=0.8,
                chunk_size=8,
            ),
        )
    ]  # fmt: skip
    if loss_type in losses.SPARSE_LOSS_TYPES:
        cases.append(
            (
                lambda logits: losses.sparse_distillation_loss(
                    logits, ids, topk_logprobs, tail, labels, loss_type=loss_type, kd_ratio=0.8
                ),
                lambda hidden: losses.chunked_sparse_distillation_loss(
                    hidden, identity, ids, topk_logprobs.float(), tail.float(), labels, loss_type=loss_type,
                    kd_ratio=0.8, chunk_size=8,
                ),
            )
        )  # fmt: skip
    for reference_loss, chunked_loss in cases:
        logits = student.clone().requires_grad_()
        expected = reference_loss(logits)
        (expected_grad,) = torch.autograd.grad(expected.loss, logits)
        hidden = student.float().requires_grad_()
        out = chunked_loss(hidden)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-6)


def test_sparse_loss_reads_cache_dtypes_and_padded_student_vocab():
    # the cache stores uint16 ids and float16 log-probs; the student embedding may be padded past the tokenizer
    student, teacher, labels = make_inputs(seed=35, vocab=VOCAB + 7)
    ids, topk_logprobs, tail = make_cache(teacher[:, :VOCAB], top_k=12)
    labels = labels.clamp(max=VOCAB - 1)
    exact = losses.sparse_distillation_loss(
        student[:, :VOCAB], ids, topk_logprobs, tail, labels, teacher_vocab_size=VOCAB
    )
    stored = losses.sparse_distillation_loss(
        student.float(), ids.to(torch.uint16), topk_logprobs.half(), tail.half(), labels, shared_vocab_size=VOCAB
    )
    assert stored.loss.dtype == torch.float32
    assert stored.kd_loss.item() == pytest.approx(exact.kd_loss.item(), rel=1e-2)
    teacher_top1 = ids[:, 0][labels != -100]
    assert stored.top1_agreement == pytest.approx(
        (student.detach()[:, :VOCAB].argmax(-1)[labels != -100] == teacher_top1).double().mean().item()
    )


def test_sparse_loss_with_a_zero_tail_stays_finite_for_reverse_kl():
    student, teacher, labels = make_inputs(seed=36)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=5)
    tail = torch.full_like(tail, -math.inf)  # what a cache holds when the top-k rounds to all the mass
    out = losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels, loss_type="reverse_kl")
    assert torch.isfinite(out.loss)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.isfinite(grad).all()


def test_sparse_all_ignored_and_bad_inputs():
    student, teacher, labels = make_inputs(seed=37)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=4)
    out = losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, torch.full_like(labels, -100))
    assert out.loss.item() == 0.0 and out.num_valid_tokens == 0
    for loss_type in ("mse", "skew_kl"):
        with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
            losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels, loss_type=loss_type)
    with pytest.raises(ValueError, match="cache_temperature=0"):
        losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels, cache_temperature=0)
    with pytest.raises(ValueError, match="teacher_topk_ids shape"):
        losses.sparse_distillation_loss(student, ids[:, :3], topk_logprobs, tail, labels)
    with pytest.raises(ValueError, match="teacher_tail_logprob shape"):
        losses.sparse_distillation_loss(student, ids, topk_logprobs, tail[:-1], labels)
    with pytest.raises(ValueError, match="teacher_vocab_size=3"):
        losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels, teacher_vocab_size=3)
    bad_ids = ids.clone()
    bad_ids[labels != -100] = VOCAB + 2
    with pytest.raises(ValueError, match="outside the compared vocabulary"):
        losses.sparse_distillation_loss(student, bad_ids, topk_logprobs, tail, labels)
    bad_logprobs = topk_logprobs.clone()
    bad_logprobs[labels != -100] = float("nan")
    with pytest.raises(ValueError, match="teacher_topk_logprobs hold .* NaN"):
        losses.sparse_distillation_loss(student, ids, bad_logprobs, tail, labels)
    hidden, head, _, _, _ = make_hidden_inputs(seed=37)
    with pytest.raises(ValueError, match="teacher_tail_logprob hold"):
        losses.chunked_sparse_distillation_loss(
            hidden, head, ids, topk_logprobs, torch.full_like(tail, float("nan")), labels
        )
    # what a cache holds at ignored positions does not matter
    garbage_ids = ids.clone()
    garbage_ids[labels == -100] = 10**6
    torch.testing.assert_close(
        losses.sparse_distillation_loss(student, garbage_ids, topk_logprobs, tail, labels).loss,
        losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels).loss,
    )


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl"])
def test_chunked_equals_dense_when_every_token_is_valid(loss_type):
    # no row gather on this path: hidden states go straight to the chunks
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=25, ignore=0.0)
    assert torch.all(labels != -100)
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, loss_type=loss_type, kd_ratio=0.9
    )
    chunked = losses.chunked_distillation_loss(
        student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
        chunk_size=10, loss_type=loss_type, kd_ratio=0.9,
    )  # fmt: skip
    assert_same_output(chunked, dense)
    grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert_close64(grad, expected)


def test_chunked_loss_with_a_plain_callable_head_gives_gradients_to_the_tensors_it_closes_over():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=26)
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, loss_type="jsd", kd_ratio=0.5
    )
    weight = student_head.weight
    for hidden in (student_hidden, student_hidden.detach()):
        chunked = losses.chunked_distillation_loss(
            hidden, lambda h: h @ weight.T, labels, teacher_hidden=teacher_hidden,
            teacher_head=lambda h: h @ teacher_head.weight.T, chunk_size=6, loss_type="jsd", kd_ratio=0.5,
        )  # fmt: skip
        assert_same_output(chunked, dense)
        assert_close64(torch.autograd.grad(chunked.loss, weight)[0], dense_grads[1])


def test_chunked_sparse_with_a_padded_student_vocab_matches_the_dense_sparse_form():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=38, vocab=VOCAB + 7)
    labels = labels.clamp(max=VOCAB - 1)
    teacher_logits = (teacher_hidden[:, :HIDDEN] @ student_head.weight[:VOCAB].T).detach() * 1.5
    ids, topk_logprobs, tail = make_cache(teacher_logits, top_k=10)
    common = {"loss_type": "jsd", "kd_ratio": 0.5, "shared_vocab_size": VOCAB, "temperature": 2.0}
    dense = losses.sparse_distillation_loss(student_head(student_hidden), ids, topk_logprobs, tail, labels, **common)
    dense_grads = torch.autograd.grad(dense.loss, [student_hidden, student_head.weight])
    chunked = losses.chunked_sparse_distillation_loss(
        student_hidden, student_head, ids, topk_logprobs, tail, labels, chunk_size=8, **common
    )
    assert_same_output(chunked, dense)
    grads = torch.autograd.grad(chunked.loss, [student_hidden, student_head.weight])
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert_close64(grad, expected)


def test_more_bad_inputs_raise_clear_errors():
    student, teacher, labels = make_inputs(seed=39)
    with pytest.raises(ValueError, match="slice both to the shared vocabulary"):
        token_divergence(student, teacher[:, :-1])
    with pytest.raises(ValueError, match="num_items_in_batch has shape"):
        distillation_loss(student, teacher, labels, num_items_in_batch=torch.tensor([3, 4]))
    hidden, head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=39)
    with pytest.raises(ValueError, match="teacher_hidden shape"):
        losses.chunked_distillation_loss(
            hidden, head, labels, teacher_hidden=teacher_hidden[:-1], teacher_head=teacher_head
        )


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_chunked_loss_on_cuda_matches_dense_and_uses_less_memory(loss_type):
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens, hidden_size, vocab = 4096, 256, 32000
    student_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device, torch.bfloat16)
    teacher_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device, torch.bfloat16).requires_grad_(False)
    student_hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, torch.bfloat16).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

    def run(chunked: bool):
        student_hidden.grad = None
        student_head.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if chunked:
            out = losses.chunked_distillation_loss(
                student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                loss_type=loss_type, chunk_size=512,
            )  # fmt: skip
        else:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_hidden)
            out = distillation_loss(student_head(student_hidden), teacher_logits, labels, loss_type=loss_type)
        out.loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        return out.loss.item(), student_hidden.grad.float().clone(), student_head.weight.grad.float().clone(), peak

    dense_loss, dense_hidden_grad, dense_weight_grad, dense_peak = run(False)
    chunked_loss, chunked_hidden_grad, chunked_weight_grad, chunked_peak = run(True)
    assert chunked_loss == pytest.approx(dense_loss, rel=1e-4)
    # bfloat16 matmuls round differently per chunk: compare whole gradients by their relative error
    for chunked_grad, dense_grad in (
        (chunked_hidden_grad, dense_hidden_grad),
        (chunked_weight_grad, dense_weight_grad),
    ):
        assert (chunked_grad - dense_grad).norm() <= 2e-2 * dense_grad.norm()
    assert chunked_peak < 0.5 * dense_peak


def test_chunked_loss_under_autocast_keeps_float32_sums():
    """Trainers with bf16=True compute the loss under autocast: the heads may run in bfloat16, the sums must not."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    student_head = torch.nn.Linear(16, 300, bias=False)
    teacher_head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    teacher_hidden = torch.randn(40, 16, generator=generator)
    labels = torch.randint(0, 300, (40,), generator=generator)
    kwargs = dict(teacher_hidden=teacher_hidden, teacher_head=teacher_head, loss_type="jsd", chunk_size=16)
    reference = losses.chunked_distillation_loss(hidden, student_head, labels, **kwargs).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses._row_dot(torch.rand(4, 8), torch.rand(4, 8)).dtype == torch.float32
        mixed = losses.chunked_distillation_loss(hidden, student_head, labels, **kwargs).loss
    assert mixed.dtype == torch.float32
    # only the bfloat16 head matmuls differ
    assert mixed.item() == pytest.approx(reference.item(), rel=2e-2)
