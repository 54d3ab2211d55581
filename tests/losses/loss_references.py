"""Naive float64 references and input builders that the loss tests share."""

from __future__ import annotations

import pytest
import torch

from hf_interop.losses import LOSS_TYPES, distillation_loss

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
# inputs of the chunked forms (hidden states and heads) and of the sparse forms (a cached teacher)


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


def make_cache(teacher_logits, top_k, cache_temperature=1.0, dtype=torch.float64):
    log_probs = torch.log_softmax(teacher_logits.double() / cache_temperature, -1)
    topk_logprobs, topk_ids = log_probs.topk(top_k, dim=-1)
    tail = torch.log1p(-topk_logprobs.exp().sum(-1).clamp(max=1.0))
    return topk_ids, topk_logprobs.to(dtype), tail.to(dtype)
