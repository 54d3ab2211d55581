"""Sparse losses with a tail prior (`teacher_tail_prior_logprobs`): the cached teacher's tail mass spread over the
tokens outside its top-k in proportion to a prior. Checked against a naive float64 reference (values and gradients,
every sparse loss type, re-tempering), by its properties (a prior equal to the teacher's own tail gives the dense
loss; the whole vocabulary in the top-k ignores the prior), chunked against dense, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from hf_interop import losses

N_TOKENS, VOCAB, HIDDEN = 29, 83, 12

CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0, "cache_temperature": 1.0}),
    ("reverse_kl", {"temperature": 0.8, "cache_temperature": 1.3}),
    ("jsd", {}),
    ("jsd", {"jsd_beta": 0.1, "temperature": 1.5, "cache_temperature": 1.5}),
    ("jsd", {"jsd_beta": 1.0}),
    ("tvd", {"temperature": 2.0}),
]


def _case_id(case):
    loss_type, kwargs = case
    return loss_type + "".join(f"-{k}={v}" for k, v in kwargs.items())


def make_inputs(seed, n=N_TOKENS, vocab=VOCAB, ignore=0.25):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3.0).requires_grad_()
    teacher = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3.0
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignore] = -100
    prior = torch.log_softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 2.0, -1)
    return student, teacher, labels, prior


def make_cache(teacher_logits, top_k, cache_temperature=1.0):
    log_probs = torch.log_softmax(teacher_logits.double() / cache_temperature, -1)
    topk_logprobs, topk_ids = log_probs.topk(top_k, dim=-1)
    tail = torch.log1p(-topk_logprobs.exp().sum(-1).clamp(max=1.0))
    return topk_ids, topk_logprobs, tail


def assert_close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-10)


def reference_loss(
    student, ids, topk_logprobs, tail, labels, prior, loss_type, temperature=1.0, cache_temperature=1.0,
    jsd_beta=0.5, kd_ratio=1.0,
):  # fmt: skip
    """Per token, in probability space: the teacher rebuilt over the vocabulary, re-tempered, explicit formulas."""
    kd_sum = student.new_zeros((), dtype=torch.float64)
    ce_sum = student.new_zeros((), dtype=torch.float64)
    count = 0
    prior_probs = prior.double().exp()
    for i in range(labels.numel()):
        if labels[i] == -100:
            continue
        count += 1
        top = topk_logprobs[i].double().exp()
        tail_mass = tail[i].double().exp()
        total = top.sum() + tail_mass  # 1 up to rounding; the loss renormalises
        outside = torch.ones(student.shape[-1], dtype=torch.bool)
        outside[ids[i]] = False
        p = torch.zeros(student.shape[-1], dtype=torch.float64)
        p[ids[i]] = top / total
        p[outside] = tail_mass / total * prior_probs[outside] / prior_probs[outside].sum()
        p = p ** (cache_temperature / temperature)
        p = p / p.sum()
        q = torch.softmax(student[i].double() / temperature, -1)

        def kl(a, b):
            return (a * (torch.log(a) - torch.log(b))).sum()

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


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_tail_prior_loss_matches_float64_reference_values_and_gradients(case):
    loss_type, kwargs = case
    student, teacher, labels, prior = make_inputs(seed=40)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=7, cache_temperature=kwargs.get("cache_temperature", 1.0))
    out = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, loss_type=loss_type, kd_ratio=0.8,
        teacher_tail_prior_logprobs=prior, **kwargs,
    )  # fmt: skip
    expected = reference_loss(student, ids, topk_logprobs, tail, labels, prior, loss_type, kd_ratio=0.8, **kwargs)
    assert_close64(out.loss, expected)
    (grad,) = torch.autograd.grad(out.loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert_close64(grad, expected_grad)


@pytest.mark.parametrize("top_k", [9, VOCAB])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunked_tail_prior_equals_dense_tail_prior_values_and_gradients(case, top_k):
    loss_type, kwargs = case
    generator = torch.Generator().manual_seed(41)
    hidden = torch.randn(N_TOKENS, HIDDEN, generator=generator, dtype=torch.float64).requires_grad_()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64))
    _, teacher, labels, prior = make_inputs(seed=42)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=top_k, cache_temperature=kwargs.get("cache_temperature", 1.0))
    common = {"loss_type": loss_type, "kd_ratio": 0.7, "num_items_in_batch": 31, "teacher_tail_prior_logprobs": prior}
    dense = losses.sparse_distillation_loss(head(hidden), ids, topk_logprobs, tail, labels, **common, **kwargs)
    dense_grads = torch.autograd.grad(dense.loss, [hidden, head.weight])
    for chunk_size, fused_backward in ((6, True), (11, False)):
        chunked = losses.chunked_sparse_distillation_loss(
            hidden.view(1, N_TOKENS, HIDDEN), head, ids.view(1, N_TOKENS, -1), topk_logprobs.view(1, N_TOKENS, -1),
            tail.view(1, N_TOKENS), labels.view(1, N_TOKENS), chunk_size=chunk_size, fused_backward=fused_backward,
            **common, **kwargs,
        )  # fmt: skip
        assert_close64(chunked.loss, dense.loss)
        assert_close64(chunked.kd_loss, dense.kd_loss)
        assert_close64(chunked.ce_loss, dense.ce_loss)
        assert chunked.top1_agreement == pytest.approx(dense.top1_agreement)
        grads = torch.autograd.grad(chunked.loss, [hidden, head.weight])
        for grad, expected in zip(grads, dense_grads, strict=True):
            assert_close64(grad, expected)


@pytest.mark.parametrize("loss_type", losses.SPARSE_LOSS_TYPES)
def test_a_prior_equal_to_the_teachers_own_distribution_gives_the_dense_loss(loss_type):
    # spreading the tail like the teacher itself rebuilds the teacher exactly: the sparse loss becomes the dense one
    student, teacher, labels, _ = make_inputs(seed=43, ignore=0.0)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=5)
    for i in range(4):
        kwargs = {"loss_type": loss_type, "temperature": 1.7, "kd_ratio": 0.9}
        own = torch.log_softmax(teacher[i], -1)
        sparse = losses.sparse_distillation_loss(
            student[i : i + 1], ids[i : i + 1], topk_logprobs[i : i + 1], tail[i : i + 1], labels[i : i + 1],
            teacher_tail_prior_logprobs=own, **kwargs,
        )  # fmt: skip
        dense = losses.distillation_loss(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], **kwargs)
        assert_close64(sparse.loss, dense.loss)
        assert_close64(*(torch.autograd.grad(out.loss, student)[0] for out in (sparse, dense)))


def test_a_uniform_prior_reads_the_cache_like_its_size_report_and_moves_the_tail_off_the_students_shape():
    student, teacher, labels, _ = make_inputs(seed=44, ignore=0.0)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=6)
    uniform = torch.full((VOCAB,), -3.0, dtype=torch.float64)  # any constant: normalisation does not matter
    out = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, teacher_tail_prior_logprobs=uniform, kd_ratio=1.0
    )
    # forward KL against top-k + an evenly spread tail, written out with dense tensors
    rebuilt = torch.full_like(teacher, 0.0)
    rebuilt += (tail.exp() / (VOCAB - 6)).unsqueeze(-1)
    rebuilt.scatter_(-1, ids, topk_logprobs.exp())
    expected = losses.distillation_loss(student, rebuilt.log(), labels, kd_ratio=1.0)
    assert_close64(out.loss, expected.loss)
    # the k+1 bucket loss never exceeds it (coarse-graining) and differs once the student's tail is not uniform
    bucket = losses.sparse_distillation_loss(student, ids, topk_logprobs, tail, labels, kd_ratio=1.0)
    assert bucket.kd_loss < out.kd_loss


def test_float16_cache_and_float32_student_with_a_prior_stay_close_to_float64():
    student, teacher, labels, prior = make_inputs(seed=45)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=10)
    exact = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, teacher_tail_prior_logprobs=prior
    )
    stored = losses.sparse_distillation_loss(
        student.float(), ids.to(torch.uint16), topk_logprobs.half(), tail.half(), labels,
        teacher_tail_prior_logprobs=prior.float(),
    )  # fmt: skip
    assert stored.loss.dtype == torch.float32
    assert stored.kd_loss.item() == pytest.approx(exact.kd_loss.item(), rel=1e-2)


def test_a_tail_that_rounded_to_zero_stays_finite_for_reverse_kl():
    student, teacher, labels, prior = make_inputs(seed=46)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=5)
    tail = torch.full_like(tail, -float("inf"))
    out = losses.sparse_distillation_loss(
        student, ids, topk_logprobs, tail, labels, loss_type="reverse_kl", teacher_tail_prior_logprobs=prior
    )
    assert torch.isfinite(out.loss)
    assert torch.isfinite(torch.autograd.grad(out.loss, student)[0]).all()


def test_bad_priors_raise_clear_errors_for_both_forms():
    student, teacher, labels, prior = make_inputs(seed=47)
    ids, topk_logprobs, tail = make_cache(teacher, top_k=4)
    hidden = torch.randn(N_TOKENS, HIDDEN, dtype=torch.float64)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.float64)
    bad = prior.clone()
    bad[3] = -float("inf")
    for value, match in (
        (prior[:-1], r"teacher_tail_prior_logprobs shape \(82,\) must be \(83,\)"),
        (prior.view(1, -1), r"shape \(1, 83\)"),
        (bad, "teacher_tail_prior_logprobs hold NaN or infinite"),
        (torch.full_like(prior, float("nan")), "teacher_tail_prior_logprobs hold NaN or infinite"),
    ):
        with pytest.raises(ValueError, match=match):
            losses.sparse_distillation_loss(
                student, ids, topk_logprobs, tail, labels, teacher_tail_prior_logprobs=value
            )
        with pytest.raises(ValueError, match=match):
            losses.chunked_sparse_distillation_loss(
                hidden, head, ids, topk_logprobs, tail, labels, teacher_tail_prior_logprobs=value
            )
