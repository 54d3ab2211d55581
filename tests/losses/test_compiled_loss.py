"""The compiled per-chunk path (`backend="compiled"`, `losses/compiled.py`): the same values and gradients as the
float64 dense reference and as the eager chunked path in float32, for every divergence, dense and sparse forms,
temperature, softcapping and a partly shared vocabulary; one compilation across chunks and steps; the eager
fallback when compilation fails; the backend argument and config field refusing bad values."""

from __future__ import annotations

import logging

import pytest
import torch
from loss_references import (
    DIVERGENCE_TYPES,
    _case_id,
    assert_close64,
    assert_same_output,
    dense_reference_and_grads,
    make_cache,
    make_hidden_inputs,
)

from hf_interop import losses
from hf_interop.losses import LOSS_TYPES, SPARSE_LOSS_TYPES, OutputHead, compiled


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _chunked(backend, student_hidden, student_head, labels, **kwargs):
    return losses.chunked_distillation_loss(student_hidden, student_head, labels, backend=backend, **kwargs)


# one case per loss type, with its non-default settings (each case is one compilation)
FLOAT64_CASES = [
    ("forward_kl", {"temperature": 2.0}),
    # temperature 1: the reduction-form kernel reuses its sums for the entropies and the cross-entropy
    ("forward_kl", {"temperature": 1.0}),
    ("reverse_kl", {"temperature": 0.7}),
    ("jsd", {"jsd_beta": 0.2, "temperature": 1.5}),
    ("jsd", {"jsd_beta": 1.0}),
    ("skew_kl", {"skew_alpha": 0.5, "temperature": 2.0}),
    ("skew_reverse_kl", {"skew_alpha": 0.3}),
    ("tvd", {}),
    ("mse", {"temperature": 2.0, "scale_by_temperature_squared": True}),
]


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=_case_id)
def test_compiled_equals_the_float64_dense_reference_for_every_loss_type(case):
    loss_type, kwargs = case
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=40)
    kwargs = {"loss_type": loss_type, "kd_ratio": 0.75, "num_items_in_batch": 40, **kwargs}
    dense, dense_grads = dense_reference_and_grads(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, **kwargs
    )
    # 28 valid tokens in chunks of 8: three full chunks and a padded one
    out = _chunked(
        "compiled", student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
        chunk_size=8, **kwargs,
    )  # fmt: skip
    assert_same_output(out, dense)
    grads = torch.autograd.grad(out.loss, [student_hidden, student_head.weight])
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert_close64(grad, expected)


def _float32_inputs(seed, vocab=96, teacher_vocab=80, n=45, hidden=24, softcap=None):
    generator = torch.Generator().manual_seed(seed)
    student_linear = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        student_linear.weight.copy_(torch.randn(vocab, hidden, generator=generator) / hidden**0.5 * 3)
    student_head = OutputHead(student_linear, multiplier=1.5, softcap=softcap)
    teacher_head = torch.nn.Linear(hidden, teacher_vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(teacher_vocab, hidden, generator=generator) / hidden**0.5 * 4)
    student_hidden = torch.randn(n, hidden, generator=generator)
    teacher_hidden = torch.randn(n, hidden, generator=generator)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.2] = -100
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compiled_equals_eager_in_float32_with_softcapping_temperature_and_a_shared_vocabulary(loss_type):
    """A softcapped, scaled head with a bias (gradients through autograd), a student vocabulary larger than the
    compared one, temperature 2 and a cross-entropy share: values and gradients agree to float32 rounding."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(seed=41, softcap=8.0)
    kwargs = {"loss_type": loss_type, "temperature": 2.0, "kd_ratio": 0.6, "shared_vocab_size": 80, "chunk_size": 16}
    results = {}
    for backend in ("eager", "compiled"):
        hidden = student_hidden.clone().requires_grad_()
        out = _chunked(backend, hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                       **kwargs)  # fmt: skip
        grads = torch.autograd.grad(out.loss, [hidden, *student_head.parameters()])
        results[backend] = (out, grads)
    (eager, eager_grads), (fused, fused_grads) = results["eager"], results["compiled"]
    for name in ("loss", "kd_loss", "ce_loss"):
        torch.testing.assert_close(getattr(fused, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
    assert fused.top1_agreement == eager.top1_agreement
    assert fused.teacher_entropy == pytest.approx(eager.teacher_entropy, rel=1e-5)
    assert fused.student_entropy == pytest.approx(eager.student_entropy, rel=1e-5)
    for grad, expected in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", SPARSE_LOSS_TYPES)
def test_compiled_sparse_forms_equal_the_eager_ones_with_and_without_a_tail_prior(loss_type):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=42)
    ids, topk_logprobs, tail = make_cache(teacher_head(teacher_hidden).detach(), top_k=6)
    topk_logprobs[3, -2:] = -1.0e5  # a compact cache's entries without mass
    prior = torch.log_softmax(torch.randn(student_head.out_features, dtype=torch.float64), -1)
    for tail_prior, kwargs in ((None, {"temperature": 1.0}), (prior, {"temperature": 2.0, "cache_temperature": 1.5})):
        results = []
        for backend in ("eager", "compiled"):
            out = losses.chunked_sparse_distillation_loss(
                student_hidden, student_head, ids, topk_logprobs, tail, labels, chunk_size=8, loss_type=loss_type,
                kd_ratio=0.75, teacher_tail_prior_logprobs=tail_prior, backend=backend, **kwargs,
            )  # fmt: skip
            results.append((out, torch.autograd.grad(out.loss, [student_hidden, student_head.weight])))
        (eager, eager_grads), (fused, fused_grads) = results
        assert_same_output(fused, eager)
        for grad, expected in zip(fused_grads, eager_grads, strict=True):
            assert_close64(grad, expected)


def test_one_compilation_across_chunks_steps_and_token_counts():
    """Chunks are padded to one shape, so steps with different numbers of valid tokens reuse the first compilation
    (a vocabulary no other test uses makes this configuration's first compilation happen here)."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(
        seed=43, vocab=53, teacher_vocab=53, n=70
    )
    before = _unique_graphs()
    for step, num_tokens in enumerate((70, 57, 41, 12)):  # 5, 4, 3 and 1 chunks of 16 rows
        hidden = student_hidden[:num_tokens].clone().requires_grad_()
        out = _chunked("compiled", hidden, student_head, labels[:num_tokens], teacher_hidden=teacher_hidden[:num_tokens],
                       teacher_head=teacher_head, chunk_size=16, loss_type="tvd", temperature=2.0 + step)  # fmt: skip
        out.loss.backward()
        assert torch.isfinite(hidden.grad).all()
    assert _unique_graphs() - before == 1


def test_auto_keeps_small_chunks_eager_and_compiles_large_ones(monkeypatch):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(
        seed=44, vocab=59, teacher_vocab=59, n=20
    )
    kwargs = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
    before = _unique_graphs()
    eager = _chunked("auto", student_hidden, student_head, labels, **kwargs)
    assert _unique_graphs() == before  # 32 rows x 59 columns: not worth a compilation
    monkeypatch.setattr(compiled, "_AUTO_MIN_ELEMENTS", 0)
    fused = _chunked("auto", student_hidden, student_head, labels, **kwargs)
    assert _unique_graphs() == before + 1
    torch.testing.assert_close(fused.loss, eager.loss, rtol=1e-5, atol=1e-6)


def _failing_compilation(monkeypatch):
    def broken(spec):
        def kernel(*tensors):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

        return kernel

    monkeypatch.setattr(compiled, "_compiled_kernel", broken)
    monkeypatch.setattr(compiled._CompileState, "failure", None)
    monkeypatch.setattr(compiled, "_AUTO_MIN_ELEMENTS", 0)


def test_a_failed_compilation_falls_back_to_eager_with_one_warning_under_auto(monkeypatch, caplog):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(seed=45)
    kwargs = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head, "shared_vocab_size": 80}
    eager = _chunked("eager", student_hidden, student_head, labels, loss_type="jsd", **kwargs)
    _failing_compilation(monkeypatch)
    with caplog.at_level(logging.WARNING):
        first = _chunked("auto", student_hidden, student_head, labels, loss_type="jsd", **kwargs)
        second = _chunked("auto", student_hidden, student_head, labels, loss_type="jsd", **kwargs)
    warnings = [
        record.getMessage()
        for record in caplog.records
        if "compiled loss kernel is unavailable" in record.getMessage()
    ]
    assert len(warnings) <= 1  # once per process (an earlier test may have used up the one warning)
    if warnings:
        assert "InvalidCxxCompiler" in warnings[0] and "loss_backend='eager'" in warnings[0]
    assert compiled.compilation_unavailable().startswith("RuntimeError: InvalidCxxCompiler")
    for out in (first, second):
        torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
        assert out.top1_agreement == eager.top1_agreement
    with pytest.raises(
        RuntimeError, match=r"'compiled' was requested but torch.compile failed: .*InvalidCxxCompiler.*'auto'"
    ):
        _chunked("compiled", student_hidden, student_head, labels, loss_type="jsd", **kwargs)


def test_a_missing_cpp_compiler_is_a_real_compilation_failure(monkeypatch):
    """Inductor pointed at a compiler that does not exist (no cached kernel to reuse): `compiled` says so."""
    inductor_config = pytest.importorskip("torch._inductor.config")
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/bin/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(compiled._CompileState, "failure", None)
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(
        seed=46, vocab=61, teacher_vocab=61
    )
    kwargs = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head, "loss_type": "skew_kl"}
    with pytest.raises(RuntimeError, match="'compiled' was requested but torch.compile failed"):
        _chunked("compiled", student_hidden, student_head, labels, **kwargs)
    eager = _chunked("eager", student_hidden, student_head, labels, **kwargs)
    fallback = _chunked("auto", student_hidden, student_head, labels, **kwargs)  # the failure is remembered
    torch.testing.assert_close(fallback.loss, eager.loss, rtol=1e-5, atol=1e-6)


def test_bad_backends_are_refused_before_any_work(tmp_path):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = make_hidden_inputs(seed=47)
    with pytest.raises(ValueError, match=r"backend='fast' is not a loss backend; use one of \['auto'"):
        _chunked(
            "fast", student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head
        )
    ids, topk_logprobs, tail = make_cache(teacher_head(teacher_hidden).detach(), top_k=4)
    with pytest.raises(ValueError, match="backend='liger' has no sparse"):
        losses.chunked_sparse_distillation_loss(
            student_hidden, student_head, ids, topk_logprobs, tail, labels, backend="liger"
        )
    from hf_interop import DistillationConfig

    with pytest.raises(ValueError, match=r"loss_backend='triton' is not known"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", loss_backend="triton")
    assert DistillationConfig(output_dir=str(tmp_path), report_to="none").loss_backend == "auto"


def test_liger_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from hf_interop import DistillationConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'hf_interop\[liger-kernel\]'"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", loss_backend="liger")


@pytest.mark.parametrize("loss_type", sorted(set(DIVERGENCE_TYPES) - {"forward_kl", "reverse_kl", "jsd"}))
def test_liger_refuses_a_divergence_it_does_not_have(tmp_path, monkeypatch, loss_type):
    import importlib.util

    from hf_interop import DistillationConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=rf"loss_backend='liger' has no '{loss_type}' loss"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", loss_backend="liger", loss_type=loss_type)


def test_liger_refuses_what_it_cannot_compute_exactly_and_auto_does_not_insist():
    """On CPU (or without the package, or with a softcapped head) `liger` names the reason; `auto` computes."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _float32_inputs(seed=48, softcap=5.0)
    kwargs = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head, "shared_vocab_size": 80}
    with pytest.raises(ValueError, match=r"backend='liger' cannot compute this loss: Liger-Kernel.*'auto'"):
        _chunked("liger", student_hidden, student_head, labels, **kwargs)
    with pytest.raises(ValueError, match=r"Liger-Kernel has no 'tvd' loss"):
        _chunked("liger", student_hidden, student_head, labels, loss_type="tvd", **kwargs)
    auto, eager = (_chunked(backend, student_hidden, student_head, labels, **kwargs) for backend in ("auto", "eager"))
    torch.testing.assert_close(auto.loss, eager.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("loss_type", "jsd_beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)]
)
def test_compiled_and_liger_match_eager_on_cuda(loss_type, jsd_beta):
    """Our compiled kernel (Triton) and, when installed, Liger's fused linear JSD against the eager path, bfloat16
    heads, within bfloat16 tolerance."""
    import importlib.util

    backends = ["compiled"] + (["liger"] if importlib.util.find_spec("liger_kernel") is not None else [])
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(49)
    tokens, hidden_size, vocab = 1024, 256, 8192
    student_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device, torch.bfloat16)
    teacher_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device, torch.bfloat16).requires_grad_(False)
    student_hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, torch.bfloat16)
    teacher_hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    results = {}
    for backend in [*backends, "eager"]:
        hidden = student_hidden.clone().requires_grad_()
        student_head.weight.grad = None
        out = _chunked(backend, hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                       loss_type=loss_type, jsd_beta=jsd_beta, temperature=2.0, compute_ce_loss=False)  # fmt: skip
        out.loss.backward()
        results[backend] = (out.loss.float(), hidden.grad.float(), student_head.weight.grad.float())
    for backend in backends:
        for value, expected in zip(results[backend], results["eager"], strict=True):
            torch.testing.assert_close(value, expected, rtol=2e-2, atol=2e-3 * expected.abs().max().item())
