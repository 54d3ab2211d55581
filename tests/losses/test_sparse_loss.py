"""The sparse forms (cached top-k teacher + tail bucket): against a float64 reference, equal to the dense loss
with the whole vocabulary, exact re-tempering of a uniform tail, closer to the dense loss as k grows, the
chunked sparse form against the sparse one, cache dtypes, padded student vocabularies, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from loss_references import (
    HIDDEN,
    N_TOKENS,
    VOCAB,
    _case_id,
    assert_close64,
    assert_same_output,
    make_cache,
    make_hidden_inputs,
    make_inputs,
)

from hf_interop import losses
from hf_interop.losses import (
    distillation_loss,
    token_divergence,
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
