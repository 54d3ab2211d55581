"""The dense form (`distillation_loss`): against the naive float64 reference with cross-entropy, masking and the
normaliser, statistics, masking and normalisation, bad inputs."""

from __future__ import annotations

import logging

import pytest
import torch
from loss_references import (
    LOSS_CASES,
    N_TOKENS,
    VOCAB,
    _case_id,
    assert_close64,
    make_hidden_inputs,
    make_inputs,
    reference_loss,
)

from hf_interop import logging_utils, losses
from hf_interop.losses import (
    DistillationLossOutput,
    distillation_loss,
    token_divergence,
)

# ---------------------------------------------------------------------------------------------------------------
# dense form against the reference


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
