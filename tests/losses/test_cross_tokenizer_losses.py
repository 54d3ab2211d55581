"""Cross-tokenizer losses: ULD, the matched-vocabulary divergence and the hybrid span loss, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from cross_tokenizer_samples import TEXTS

from hf_interop import losses
from hf_interop.distill.cross_tokenizer_collator import CrossTokenizerDistillationCollator
from hf_interop.loading import load_gpt2_tokenizer
from hf_interop.losses.cross_tokenizer import (
    cross_tokenizer_distillation_loss,
    matched_vocabulary_divergence,
    span_aligned_distillation_loss,
    uld_distance,
    uld_loss,
)
from hf_interop.text_alignment import SpanAlignmentIndex, build_vocabulary_mapping


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def _uld_reference(student_probs, teacher_probs):
    """Float64, one row at a time, written out: sort descending, zero-pad, L1."""
    rows = []
    for p_s, p_t in zip(student_probs.double(), teacher_probs.double(), strict=True):
        a = sorted(p_s.tolist(), reverse=True)
        b = sorted(p_t.tolist(), reverse=True)
        width = max(len(a), len(b))
        a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
        rows.append(sum(abs(x - y) for x, y in zip(a, b, strict=True)))
    return torch.tensor(rows, dtype=torch.float64)


def test_uld_matches_float64_reference_with_gradients():
    torch.manual_seed(0)
    student = (torch.randn(6, 7) * 2).requires_grad_()
    teacher = torch.randn(6, 11) * 2
    temperature = 2.0
    value = uld_loss(student, teacher, temperature=temperature)
    expected = _uld_reference((student / temperature).softmax(-1).detach(), (teacher / temperature).softmax(-1))
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)
    # gradient against a float64 autograd reference
    value.sum().backward()
    student64 = student.detach().double().requires_grad_()
    p_s = (student64 / temperature).softmax(-1).sort(-1, descending=True).values
    p_t = (teacher.double() / temperature).softmax(-1).sort(-1, descending=True).values
    reference = (torch.nn.functional.pad(p_s, (0, 4)) - p_t).abs().sum()
    reference.backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda s: uld_loss(s, teacher.double(), temperature=1.5), (student64.detach().requires_grad_(),)
    )


def test_uld_properties():
    torch.manual_seed(1)
    logits = torch.randn(4, 9)
    assert torch.allclose(uld_loss(logits, logits), torch.zeros(4), atol=1e-7)
    other = torch.randn(4, 5)
    assert torch.allclose(uld_loss(logits, other), uld_loss(other, logits), atol=1e-6)  # symmetric
    shuffled = logits[:, torch.randperm(9)]
    assert torch.allclose(uld_loss(shuffled, other), uld_loss(logits, other), atol=1e-6)  # blind to token identity
    assert torch.all(uld_loss(logits, other) <= 2.0 + 1e-6)
    # top_k: exact when k covers the vocabulary, a lower bound otherwise
    assert torch.allclose(uld_loss(logits, other, top_k=5), uld_loss(logits, other), atol=1e-6)
    assert torch.all(uld_loss(logits, other, top_k=2) <= uld_loss(logits, other) + 1e-6)
    # unnormalised vectors (merged spans) are compared as they are
    p, q = torch.tensor([[0.2, 0.1]]), torch.tensor([[0.05, 0.3, 0.1]])
    torch.testing.assert_close(uld_distance(p, q), _uld_reference(p, q).float())


def _matched_reference(student_logits, teacher_logits, mapping, loss_type, temperature, beta=0.5):
    """Float64, written out: matched ids in order plus one bucket of everything else, then the divergence."""
    p_s = (student_logits.double() / temperature).softmax(-1)
    p_t = (teacher_logits.double() / temperature).softmax(-1)
    s_ids, t_ids = mapping.student_ids.tolist(), mapping.teacher_ids.tolist()
    rows = []
    for row_s, row_t in zip(p_s, p_t, strict=True):
        a = [row_s[i].item() for i in s_ids] + [1.0 - sum(row_s[i].item() for i in s_ids)]
        b = [row_t[i].item() for i in t_ids] + [1.0 - sum(row_t[i].item() for i in t_ids)]

        def kl(x, y):
            return sum(xi * math.log(xi / yi) for xi, yi in zip(x, y, strict=True) if xi > 0)

        if loss_type == "forward_kl":
            rows.append(kl(b, a) * temperature**2)
        elif loss_type == "reverse_kl":
            rows.append(kl(a, b))
        else:
            m = [beta * y + (1 - beta) * x for x, y in zip(a, b, strict=True)]
            rows.append(beta * kl(b, m) + (1 - beta) * kl(a, m))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_matched_vocabulary_divergence_matches_float64_reference(loss_type, corpus_tokenizer, gpt2_tokenizer):
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(2)
    student = (torch.randn(3, 512) * 3).requires_grad_()
    teacher = torch.randn(3, 50257) * 3
    value = matched_vocabulary_divergence(student, teacher, mapping, loss_type=loss_type, temperature=2.0)
    expected = _matched_reference(student.detach(), teacher, mapping, loss_type, 2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_prefix_projection_gives_each_teacher_token_its_longest_student_prefix(corpus_tokenizer, gpt2_tokenizer):
    """Student = the 512-token corpus tokenizer, teacher = GPT-2 (50,257 tokens, most without a same-string student
    token): every teacher id maps to the longest student token its bytes start with, checked by brute force."""
    from hf_interop.text_alignment import token_byte_strings

    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer, unmatched="prefix")
    assert mapping.teacher_to_student.shape == (50257,)
    student_bytes = {piece: i for i, piece in reversed(list(enumerate(token_byte_strings(corpus_tokenizer)))) if piece}
    teacher_bytes = token_byte_strings(gpt2_tokenizer)
    for teacher_id in [*range(0, 50257, 997), *mapping.teacher_ids[:20].tolist(), 50256]:
        piece = teacher_bytes[teacher_id]
        prefixes = [
            student_bytes[piece[:end]] for end in range(len(piece or b""), 0, -1) if piece[:end] in student_bytes
        ]
        expected = prefixes[0] if prefixes and teacher_id != 50256 else -1
        if teacher_id in mapping.teacher_ids.tolist():  # a same-string pair keeps its pairing
            expected = mapping.student_ids[mapping.teacher_ids.tolist().index(teacher_id)].item()
        assert mapping.teacher_to_student[teacher_id].item() == expected, (teacher_id, piece)
    assert (mapping.teacher_to_student >= 0).float().mean() > 0.99  # byte-level BPE: every string has a prefix
    with pytest.raises(ValueError, match="unmatched must be one of"):
        build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer, unmatched="drop")


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_prefix_projected_divergence_matches_float64_reference(loss_type, corpus_tokenizer, gpt2_tokenizer):
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer, unmatched="prefix")
    torch.manual_seed(3)
    student = (torch.randn(3, 512) * 3).requires_grad_()
    teacher = torch.randn(3, 50257) * 3
    value = matched_vocabulary_divergence(student, teacher, mapping, loss_type=loss_type, temperature=2.0)
    projection = mapping.teacher_to_student.tolist()
    p_s = (student.detach().double() / 2.0).softmax(-1)
    p_t = (teacher.double() / 2.0).softmax(-1)
    expected = []
    for row_s, row_t in zip(p_s.tolist(), p_t.tolist(), strict=True):
        moved = [0.0] * 512
        for teacher_id, target in enumerate(projection):
            if target >= 0:
                moved[target] += row_t[teacher_id]
        total = sum(moved)
        q = [x / total for x in moved]

        def kl(x, y):
            return sum(xi * math.log(xi / yi) for xi, yi in zip(x, y, strict=True) if xi > 0)

        if loss_type == "forward_kl":
            expected.append(kl(q, row_s) * 4.0)
        else:
            m = [0.5 * a + 0.5 * b for a, b in zip(q, row_s, strict=True)]
            expected.append(0.5 * kl(q, m) + 0.5 * kl(row_s, m))
    torch.testing.assert_close(value.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reverse KL is infinite"):
        matched_vocabulary_divergence(student, teacher, mapping, loss_type="reverse_kl")


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_tokenizers_hybrid_equals_same_tokenizer_kd(loss_type, corpus, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, corpus_tokenizer, max_length=24)
    texts = [{"text": text} for text in corpus["train"]["text"][:3]]
    batch = collator(texts)
    index = SpanAlignmentIndex.from_batch(batch)
    assert index.num_unmatched == 0  # every position is matched
    assert index.num_matched == int((batch["labels"][:, 1:] != -100).sum())
    mapping = build_vocabulary_mapping(corpus_tokenizer, corpus_tokenizer)
    torch.manual_seed(3)
    shape = (*batch["input_ids"].shape, 512)
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)
    ours = span_aligned_distillation_loss(student, teacher, index, mapping, loss_type=loss_type, temperature=2.0)
    reference = losses.distillation_loss(
        student[:, :-1], teacher[:, :-1], batch["labels"][:, 1:], loss_type=loss_type, temperature=2.0
    )
    torch.testing.assert_close(ours.loss, reference.kd_loss, rtol=1e-5, atol=1e-6)
    ours.loss.backward()
    assert student.grad.abs().sum() > 0


def test_merged_span_probabilities_and_weights(gpt2_tokenizer, corpus_tokenizer):
    # student: the corpus tokenizer (splits more), teacher: GPT-2
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, gpt2_tokenizer, max_length=64)
    batch = collator([{"text": TEXTS[4]}, {"text": TEXTS[1]}])
    index = SpanAlignmentIndex.from_batch(batch)
    assert index.num_matched > 0 and index.num_unmatched > 0
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(4)
    student = torch.randn(*batch["input_ids"].shape, 512, dtype=torch.float64)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 50257, dtype=torch.float64)
    only_unmatched = span_aligned_distillation_loss(student, teacher, index, mapping, matched_weight=0.0)
    # float64 reference of the unmatched part: merged span probabilities written out
    flat_s, flat_t = student.reshape(-1, 512), teacher.reshape(-1, 50257)
    total = 0.0
    for span in range(index.num_unmatched):

        def merged(flat, base_rows, rows, tokens, spans, span=span):
            probs = flat[base_rows[span]].softmax(-1)
            for row, token, owner in zip(rows.tolist(), tokens.tolist(), spans.tolist(), strict=True):
                if owner == span:
                    probs = probs * flat[row].softmax(-1)[token]
            return probs

        p_s = merged(
            flat_s,
            index.unmatched_student_rows,
            index.student_continuation_rows,
            index.student_continuation_tokens,
            index.student_continuation_spans,
        )
        p_t = merged(
            flat_t,
            index.unmatched_teacher_rows,
            index.teacher_continuation_rows,
            index.teacher_continuation_tokens,
            index.teacher_continuation_spans,
        )
        total += _uld_reference(p_s[None], p_t[None]).item()
    num_spans = index.num_matched + index.num_unmatched
    assert math.isclose(only_unmatched.loss.item(), total / num_spans, rel_tol=1e-5)
    assert math.isclose(only_unmatched.unmatched_loss.item(), total / index.num_unmatched, rel_tol=1e-5)
    both = span_aligned_distillation_loss(student, teacher, index, mapping, matched_weight=1.0, unmatched_weight=0.5)
    expected = (both.matched_loss * index.num_matched + 0.5 * total) / num_spans
    assert math.isclose(both.loss.item(), expected.item(), rel_tol=1e-5)
    # a global normaliser (gradient accumulation) replaces the local span count
    scaled = span_aligned_distillation_loss(student, teacher, index, mapping, num_items_in_batch=1000)
    full = span_aligned_distillation_loss(student, teacher, index, mapping)
    assert math.isclose(scaled.loss.item() * 1000, full.loss.item() * num_spans, rel_tol=1e-6)
    # plain ULD compares matched spans by ULD too
    plain = span_aligned_distillation_loss(student, teacher, index, None, loss_type="uld")
    assert torch.isfinite(plain.loss) and plain.loss > 0
    with pytest.raises(ValueError, match="loss_type='tvd'"):
        span_aligned_distillation_loss(student, teacher, index, mapping, loss_type="tvd")


def test_cross_tokenizer_loss_mixes_ce_and_kd(gpt2_tokenizer, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(gpt2_tokenizer, corpus_tokenizer, max_length=16)
    batch = collator([{"text": TEXTS[0]}, {"text": "short"}])
    assert batch["labels"][1].tolist().count(-100) >= 1 and batch["labels"][:, 0].eq(-100).all()
    index = SpanAlignmentIndex.from_batch(batch)
    mapping = build_vocabulary_mapping(gpt2_tokenizer, corpus_tokenizer)
    torch.manual_seed(5)
    student = torch.randn(*batch["input_ids"].shape, 50257)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 512)
    result = cross_tokenizer_distillation_loss(student, teacher, batch["labels"], index, mapping, kd_ratio=0.25)
    shift_labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 50257), shift_labels.reshape(-1))
    torch.testing.assert_close(result.ce_loss, ce)
    assert result.num_valid_tokens == int((shift_labels != -100).sum())
    torch.testing.assert_close(result.loss, 0.25 * result.kd_loss + 0.75 * result.ce_loss)


@pytest.mark.gpu
def test_hybrid_loss_on_cuda_equals_cpu(gpt2_tokenizer, corpus_tokenizer):
    collator = CrossTokenizerDistillationCollator(corpus_tokenizer, gpt2_tokenizer, max_length=32)
    batch = collator([{"text": text} for text in TEXTS[:3]])
    index = SpanAlignmentIndex.from_batch(batch)
    mapping = build_vocabulary_mapping(corpus_tokenizer, gpt2_tokenizer)
    torch.manual_seed(6)
    student = torch.randn(*batch["input_ids"].shape, 512)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, 50257)
    on_cpu = span_aligned_distillation_loss(student, teacher, index, mapping).loss
    on_gpu = span_aligned_distillation_loss(student.cuda(), teacher.cuda(), index, mapping).loss
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
