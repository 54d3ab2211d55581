"""The chunked form (`chunked_distillation_loss`) against the dense one: values and gradients for every loss type,
odd chunk sizes, both backward modes, precomputed teacher logits, tied and untied heads of real models, no-grad,
low precision and autocast, extreme logit scales (the chunked sparse form too), bad inputs; memory on CUDA."""

from __future__ import annotations

import pytest
import torch
from loss_references import (
    DIVERGENCE_TYPES,
    HIDDEN,
    LOSS_CASES,
    N_TOKENS,
    VOCAB,
    _case_id,
    assert_close64,
    assert_same_output,
    dense_reference_and_grads,
    make_cache,
    make_hidden_inputs,
)

from hf_interop import losses
from hf_interop.losses import (
    distillation_loss,
)

# ---------------------------------------------------------------------------------------------------------------
# chunked form against the dense form


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
