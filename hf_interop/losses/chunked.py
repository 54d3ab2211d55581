"""The chunked form: the distillation loss from final hidden states and output heads, a chunk of tokens at a time.

How the chunked forms stay cheap: for each chunk the student head runs once, the divergence and its gradient
w.r.t. the chunk's logits are computed in closed form (no autograd graph over `(chunk, vocab)` buffers), and that
gradient is pushed through the head right away into the hidden states and the head's weights; backward then only
scales what was stored. The dense and sparse forms use plain autograd and serve as the reference in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hf_interop.logging_utils import get_logger

from ..multitask.weighting import static_weighted_sum
from .compiled import KernelChunks, _check_backend, padded_rows, use_compiled
from .dense import _ALL_IGNORED_WARNING, DistillationLossOutput, _entropy_from_logits, _finish, _Statistics, _zero_loss
from .divergences import (
    _check_cross_entropy_needed,
    _check_labels_in_vocab,
    _check_loss_arguments,
    _ChunkDivergence,
    _compute_dtype,
    _divergence_and_logit_grad,
    _normalizer,
    _resolve_vocab,
    _row_dot,
    _select_valid,
    _temperature_factor,
)
from .heads import _head_parameters, _head_vocab
from .liger import liger_kd_sum, liger_unavailable

if TYPE_CHECKING:
    from torch import Tensor

logger = get_logger(__name__)


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (e.g. 1024 tokens per chunk).")


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class _ChunkRunner:
    """Loss of one chunk of student logits, its gradient w.r.t. those logits, and detached running sums.

    `kd_value_and_grad(student_logits, start, end, need_grad)` gets the chunk's detached student logits (compute
    dtype) and returns the per-token divergences, their summed gradient w.r.t. those logits (or `None`), the
    teacher's argmax, the teacher's entropy, the student's entropy (or `None`: computed here) and the number of
    vocab columns compared.
    """

    def __init__(
        self,
        valid_labels: Tensor,
        chunk_size: int,
        kd_ratio: float,
        compute_ce_loss: bool,
        kd_value_and_grad: Callable[
            [Tensor, int, int, bool], tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None, int]
        ],
    ) -> None:
        self.valid_labels = valid_labels
        self.chunk_size = chunk_size
        self.kd_ratio = kd_ratio
        self.compute_ce_loss = compute_ce_loss
        self.kd_value_and_grad = kd_value_and_grad
        self.kd_sum: Tensor | float = 0.0
        self.ce_sum: Tensor | float = 0.0
        self.statistics = _Statistics()
        self.labels_checked = False
        self.cached_student_log_probs: Tensor | None = None

    def student_logit_grad(self, divergence: _ChunkDivergence, vocab: int, student_vocab: int) -> Tensor | None:
        """The divergence's gradient over all `student_vocab` logits (0 past the `vocab` compared columns); keeps
        the student's log-probabilities for the cross-entropy when they cover its whole vocabulary."""
        grad = divergence.logit_grad
        if grad is not None and vocab < student_vocab:
            grad = F.pad(grad, (0, student_vocab - vocab))
        if vocab == student_vocab and divergence.student_log_probs is not None:
            self.cached_student_log_probs = divergence.student_log_probs
        return grad

    def output(self, total_sum: Tensor, normalizer: int | Tensor) -> DistillationLossOutput:
        """The loss output once every chunk ran: `total_sum` carries the gradients, the recorded sums are logs."""
        return _finish(
            torch.as_tensor(self.kd_sum, device=total_sum.device, dtype=total_sum.dtype),
            torch.as_tensor(self.ce_sum, device=total_sum.device, dtype=total_sum.dtype)
            if self.compute_ce_loss
            else None,
            total_sum,
            normalizer,
            int(self.valid_labels.numel()),
            self.statistics,
        )

    def chunk_bounds(self, num_tokens: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk_size, num_tokens)) for start in range(0, num_tokens, self.chunk_size)]

    @torch.no_grad()
    def loss_and_logit_grad(
        self, student_logits: Tensor, start: int, end: int, need_grad: bool, record: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        logits = student_logits.detach().to(_compute_dtype(student_logits))
        self.cached_student_log_probs = None
        kd_tokens, grad, teacher_argmax, teacher_entropy, student_entropy, vocab = self.kd_value_and_grad(
            logits, start, end, need_grad
        )
        kd = kd_tokens.sum()
        total = kd
        if need_grad and grad is not None and self.kd_ratio != 1.0:
            grad = grad.mul_(self.kd_ratio)
        student_log_probs = None
        ce = None
        if self.compute_ce_loss:
            if not self.labels_checked:
                _check_labels_in_vocab(self.valid_labels, logits.shape[-1])
                self.labels_checked = True
            labels = self.valid_labels[start:end]
            student_log_probs = self.cached_student_log_probs
            if student_log_probs is None:
                student_log_probs = F.log_softmax(logits, dim=-1)
            ce = -student_log_probs.gather(-1, labels.unsqueeze(-1)).sum()
            if self.kd_ratio != 1.0:
                total = static_weighted_sum([kd, ce], [self.kd_ratio, 1.0 - self.kd_ratio])
                if need_grad:
                    ce_grad = student_log_probs.exp()
                    ce_grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
                    grad = (
                        ce_grad.mul_(1.0 - self.kd_ratio)
                        if grad is None
                        else grad.add_(ce_grad, alpha=1.0 - self.kd_ratio)
                    )
        if record:
            self.kd_sum = self.kd_sum + kd
            if ce is not None:
                self.ce_sum = self.ce_sum + ce
            compared = logits[..., :vocab]
            if student_entropy is not None:
                pass
            elif student_log_probs is not None and vocab == logits.shape[-1]:
                student_entropy = -_row_dot(student_log_probs.exp(), student_log_probs)
            else:
                student_entropy = _entropy_from_logits(compared)
            self.statistics.add_precomputed(compared.argmax(-1), teacher_argmax, teacher_entropy, student_entropy)
        return total, grad


class _KernelRunner(_ChunkRunner):
    """A `_ChunkRunner` whose chunks go through a compiled kernel (`compiled.py`) on chunks padded to one shape:
    `kernel_chunk(logits, start, end)` gives `(grad, kd, ce, student entropy, teacher entropy, student argmax,
    teacher argmax, teacher row sums or None)` for every row of the padded chunk; padded rows are zero."""

    def __init__(
        self,
        valid_labels: Tensor,
        chunk_size: int,
        kd_ratio: float,
        compute_ce_loss: bool,
        num_valid: int,
        kernel_chunk: Callable[[Tensor, int, int], tuple],
    ) -> None:
        super().__init__(valid_labels, chunk_size, kd_ratio, compute_ce_loss, None)
        self.num_valid = num_valid
        self.kernel_chunk = kernel_chunk
        self.teacher_row_sums: list[Tensor] = []

    @torch.no_grad()
    def loss_and_logit_grad(
        self, student_logits: Tensor, start: int, end: int, need_grad: bool, record: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        logits = student_logits.detach().to(_compute_dtype(student_logits))
        if self.compute_ce_loss and not self.labels_checked:
            _check_labels_in_vocab(self.valid_labels, logits.shape[-1])
            self.labels_checked = True
        grad, kd, ce, student_entropy, teacher_entropy, student_argmax, teacher_argmax, row_sums = self.kernel_chunk(
            logits, start, end
        )
        kd = kd.sum()
        total = kd
        if self.compute_ce_loss:
            ce = ce.sum()
            if self.kd_ratio != 1.0:
                total = self.kd_ratio * kd + (1.0 - self.kd_ratio) * ce
        if record:
            real = max(0, min(end, self.num_valid) - start)
            self.kd_sum = self.kd_sum + kd
            if self.compute_ce_loss:
                self.ce_sum = self.ce_sum + ce
            if row_sums is not None:
                self.teacher_row_sums.append(row_sums[:real])
            self.statistics.add_precomputed(
                student_argmax[:real], teacher_argmax[:real], teacher_entropy[:real], student_entropy[:real]
            )
        return total, grad if need_grad else None


class _FusedChunkedLoss(torch.autograd.Function):
    """Chunk loop that computes each chunk's gradients right away (w.r.t. the hidden chunk and the head's
    parameters) and keeps only those: the student's logits never outlive their chunk, and backward is a scale."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, runner: _ChunkRunner, head: Callable, need_hidden_grad: bool, *parameters: Tensor
    ) -> Tensor:
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        parameter_grads: list[Tensor | None] = [None] * len(parameters)
        total = None
        linear = _plain_linear(head, hidden, parameters)
        for start, end in runner.chunk_bounds(hidden.shape[0]):
            hidden_chunk = hidden[start:end].detach()
            if linear is not None:
                chunk_total = _linear_chunk(linear, hidden_chunk, runner, start, end, grad_hidden, parameters,
                                            parameter_grads)  # fmt: skip
                total = chunk_total if total is None else total + chunk_total
                continue
            if need_hidden_grad:
                hidden_chunk.requires_grad_(True)
            with torch.enable_grad():
                logits = head(hidden_chunk)
            chunk_total, logit_grad = runner.loss_and_logit_grad(logits, start, end, need_grad=True)
            inputs = ([hidden_chunk] if need_hidden_grad else []) + list(parameters)
            if logits.requires_grad and logit_grad is not None:
                grads = torch.autograd.grad(
                    logits, inputs, grad_outputs=logit_grad.to(logits.dtype), allow_unused=True
                )
                if need_hidden_grad:
                    grad_hidden[start:end] = grads[0]
                    grads = grads[1:]
                for index, grad in enumerate(grads):
                    if grad is None:
                        continue
                    if parameter_grads[index] is None:
                        parameter_grads[index] = grad.float() if _low_precision(grad.dtype) else grad
                    else:
                        # in place with type promotion: a bfloat16 chunk gradient adds into the float32 sum
                        # without a float32 copy of it (the head's gradient is vocab x hidden per chunk)
                        parameter_grads[index].add_(grad)
            del logits, logit_grad
            total = chunk_total if total is None else total + chunk_total
        ctx.grad_hidden = grad_hidden
        ctx.parameter_grads = parameter_grads
        ctx.parameter_dtypes = [parameter.dtype for parameter in parameters]
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden = None
        if ctx.grad_hidden is not None:
            grad_hidden = ctx.grad_hidden * grad_total.to(ctx.grad_hidden.dtype)
        parameter_grads = [
            None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype)
            for grad, dtype in zip(ctx.parameter_grads, ctx.parameter_dtypes, strict=True)
        ]
        ctx.grad_hidden = ctx.parameter_grads = None
        return (grad_hidden, None, None, None, *parameter_grads)


def _plain_linear(head: Callable, hidden: Tensor, parameters: list[Tensor]) -> nn.Linear | None:
    """The head's `nn.Linear` when the head is just that (no scaling, no softcapping) in float32/float64 without
    autocast: its gradients then come from two in-place BLAS calls per chunk instead of autograd."""
    from .heads import OutputHead

    if type(head) is OutputHead and not (head.multiplier or head.divisor or head.softcap):
        head = head.output_embeddings
    if type(head) is not nn.Linear or torch.is_autocast_enabled(hidden.device.type):
        return None
    dtype = head.weight.dtype
    if dtype not in (torch.float32, torch.float64) or hidden.dtype != dtype:
        return None
    if any(parameter is not head.weight and parameter is not head.bias for parameter in parameters):
        return None
    return head


def _linear_chunk(
    linear: nn.Linear,
    hidden_chunk: Tensor,
    runner: _ChunkRunner,
    start: int,
    end: int,
    grad_hidden: Tensor | None,
    parameters: list[Tensor],
    parameter_grads: list[Tensor | None],
) -> Tensor:
    """One chunk through a plain linear head: logits without a graph, then `dL/dh = g W` written into its rows of
    `grad_hidden` and `dL/dW += g^T h` accumulated in place (no per-chunk `(vocab, hidden)` gradient tensor)."""
    with torch.no_grad():
        logits = F.linear(hidden_chunk, linear.weight, linear.bias)
        chunk_total, logit_grad = runner.loss_and_logit_grad(logits, start, end, need_grad=True)
        del logits
        if logit_grad is None:
            return chunk_total
        logit_grad = logit_grad.to(linear.weight.dtype)
        if grad_hidden is not None:
            torch.mm(logit_grad, linear.weight, out=grad_hidden[start:end])
        for index, parameter in enumerate(parameters):
            if parameter is linear.weight:
                if parameter_grads[index] is None:
                    parameter_grads[index] = logit_grad.t() @ hidden_chunk
                else:
                    parameter_grads[index].addmm_(logit_grad.t(), hidden_chunk)
            else:  # the bias
                chunk_bias_grad = logit_grad.sum(0)
                parameter_grads[index] = (
                    chunk_bias_grad if parameter_grads[index] is None else parameter_grads[index].add_(chunk_bias_grad)
                )
    return chunk_total


class _ChunkLogitsLoss(torch.autograd.Function):
    """One chunk's loss on its student logits, for the checkpointed path: the logit gradient it saves is dropped by
    `torch.utils.checkpoint` and recomputed, with the logits, in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, runner: _ChunkRunner, start: int, end: int, record: bool) -> Tensor:
        total, logit_grad = runner.loss_and_logit_grad(logits, start, end, need_grad=True, record=record)
        ctx.save_for_backward(logit_grad.to(logits.dtype) if logit_grad is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        (logit_grad,) = ctx.saved_tensors
        grad = None if logit_grad is None else logit_grad * grad_total.to(logit_grad.dtype)
        return grad, None, None, None, None


def _run_chunks(
    student_hidden: Tensor, runner: _ChunkRunner, student_head: Callable[[Tensor], Tensor], fused_backward: bool
) -> Tensor:
    parameters = _head_parameters(student_head)
    need_hidden_grad = student_hidden.requires_grad
    bounds = runner.chunk_bounds(len(student_hidden))
    # a plain callable may close over tensors that require grad: only checkpointing reaches those
    is_module = isinstance(student_head, nn.Module)
    if not torch.is_grad_enabled() or (is_module and not (need_hidden_grad or parameters)):
        with torch.no_grad():
            totals = [
                runner.loss_and_logit_grad(student_head(student_hidden[s:e]), s, e, need_grad=False)[0]
                for s, e in bounds
            ]
        return torch.stack(totals).sum()
    if fused_backward and is_module:
        return _FusedChunkedLoss.apply(student_hidden, runner, student_head, need_hidden_grad, *parameters)
    from torch.utils.checkpoint import checkpoint

    recomputing = [False]

    def run_chunk(hidden_chunk: Tensor, start: int, end: int) -> Tensor:
        # the recomputation in backward must not count the chunk's statistics twice
        return _ChunkLogitsLoss.apply(student_head(hidden_chunk), runner, start, end, not recomputing[0])

    totals = [checkpoint(run_chunk, student_hidden[s:e], s, e, use_reentrant=False) for s, e in bounds]
    recomputing[0] = True
    return torch.stack(totals).sum()


def _take_rows(tensor: Tensor, valid: Tensor) -> Tensor:
    """`tensor[valid]` for a 2-d tensor; a view when every row is valid (no copy, no scatter in backward)."""
    if valid.numel() == tensor.shape[0]:
        return tensor
    return tensor.index_select(0, valid)


def _zero_output(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    normalizer: int | Tensor,
    compute_ce_loss: bool,
) -> DistillationLossOutput:
    logger.warning_once(_ALL_IGNORED_WARNING)
    zero = _zero_loss(student_hidden)
    for parameter in _head_parameters(student_head):
        # keep the head in the graph so data-parallel wrappers see a (zero) gradient for it
        zero = zero + _zero_loss(parameter)
    return _finish(zero, zero.detach() if compute_ce_loss else None, zero, normalizer, 0, _Statistics())


def _checked_teacher_input(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head: Callable[[Tensor], Tensor] | None,
    teacher_logits: Tensor | None,
) -> Tensor:
    """The teacher's precomputed logits or its hidden states, whichever was given, checked against the student."""
    if teacher_logits is not None and (teacher_hidden is not None or teacher_head is not None):
        raise ValueError(
            "pass either teacher_logits or teacher_hidden + teacher_head, not both (teacher_logits was given along "
            "with teacher_hidden/teacher_head)."
        )
    if teacher_logits is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError(
            "the teacher is missing: pass teacher_hidden and teacher_head (e.g. output_logits_fn(teacher)), or "
            f"precomputed teacher_logits (got teacher_hidden={'set' if teacher_hidden is not None else None}, "
            f"teacher_head={'set' if teacher_head is not None else None})."
        )
    teacher_input = teacher_logits if teacher_logits is not None else teacher_hidden
    teacher_argument = "teacher_logits" if teacher_logits is not None else "teacher_hidden"
    if teacher_input.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"{teacher_argument} shape {tuple(teacher_input.shape)} and student_hidden shape "
            f"{tuple(student_hidden.shape)} differ before the last dim; both must be aligned with labels."
        )
    return teacher_input


def _check_finite_teacher_rows(teacher_row_sums: list[Tensor], source: str) -> None:
    # one host sync after the chunk loop: the row sums are finite iff the teacher's logits are
    if not bool(torch.isfinite(torch.cat(teacher_row_sums)).all()):
        raise ValueError(
            f"{source} hold non-finite values (NaN or inf) on valid tokens; the teacher's forward pass overflowed "
            "or its weights are broken (try teacher_dtype='float32' or 'bfloat16' instead of 'float16')."
        )


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: Callable[[Tensor], Tensor] | None = None,
    teacher_logits: Tensor | None = None,
    chunk_size: int = 1024,
    shared_vocab_size: int | None = None,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    scale_by_temperature_squared: bool | None = None,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    compute_ce_loss: bool = True,
    fused_backward: bool = True,
    backend: str = "auto",
) -> DistillationLossOutput:
    """Memory-efficient [`distillation_loss`] from final hidden states and output heads.

    Valid tokens are gathered and processed `chunk_size` at a time: each chunk's student logits are computed,
    used and dropped, the teacher's chunk is computed under `no_grad`, so neither model's full `(batch, seq,
    vocab)` logits tensor exists. Values and gradients equal the dense form's (to float32 rounding).

    Args:
        student_hidden (`torch.Tensor` of shape `(batch, seq, hidden)` or `(tokens, hidden)`):
            Final hidden states of the student (after its final norm), aligned with `labels`.
        student_head (`Callable`):
            hidden -> logits of the student, usually `output_logits_fn(student)`. When it is an `nn.Module`, its
            parameters that require grad (lm_head, or the tied input embeddings) receive their gradients through the
            fused path. Any other callable runs under checkpointing, so tensors it closes over get gradients too.
        labels (`torch.LongTensor` of shape `(batch, seq)` or `(tokens,)`):
            Target ids; positions equal to `ignore_index` are skipped before any logits are computed.
        teacher_hidden (`torch.Tensor`, *optional*):
            Final hidden states of the teacher, same leading shape; used with `teacher_head`.
        teacher_head (`Callable`, *optional*):
            hidden -> logits of the teacher (`output_logits_fn(teacher)`), run under `no_grad`.
        teacher_logits (`torch.Tensor`, *optional*):
            Precomputed teacher logits (or log-probabilities, e.g. of an ensemble) of shape `(..., vocab_t)`,
            instead of `teacher_hidden` + `teacher_head`. Never receive gradients.
        chunk_size (`int`, *optional*, defaults to `1024`):
            Valid tokens per chunk; higher is a little faster and uses more memory (about
            `chunk_size * vocab * 4 bytes` times a small factor).
        fused_backward (`bool`, *optional*, defaults to `True`):
            Compute each chunk's gradients during the forward pass (fastest: the student head runs once per chunk).
            `False` uses `torch.utils.checkpoint` per chunk instead (the head and the teacher chunk run again in
            backward): use it when the head's parameters are sharded and only materialised inside a module call
            (DeepSpeed ZeRO-3, FSDP).
        backend (`str`, *optional*, defaults to `"auto"`):
            How each chunk's divergence, cross-entropy and gradient are computed: `"eager"` (PyTorch ops),
            `"compiled"` (one `torch.compile`d kernel per chunk, chunks padded to one shape so it compiles once;
            raises if compilation fails), `"liger"` (Liger-Kernel's fused linear losses on CUDA; see
            `losses/liger.py`) or `"auto"` (Liger where it applies, else the compiled kernel for large chunks, else
            eager; a failed compilation warns once and runs eagerly). Same values either way (float32 rounding).
        shared_vocab_size, loss_type, temperature, jsd_beta, skew_alpha, scale_by_temperature_squared, kd_ratio,
        ignore_index, num_items_in_batch, compute_ce_loss:
            As in [`distillation_loss`].

    Returns:
        [`DistillationLossOutput`]; only `loss` carries gradients (`kd_loss` and `ce_loss` are detached, for logs).
    """
    _check_loss_arguments(loss_type, temperature, jsd_beta, skew_alpha, kd_ratio)
    _check_chunk_size(chunk_size)
    _check_backend(backend)
    _check_cross_entropy_needed(kd_ratio, compute_ce_loss)
    teacher_input = _checked_teacher_input(student_hidden, teacher_hidden, teacher_head, teacher_logits)
    valid, valid_labels = _select_valid(labels, student_hidden.shape[:-1], "student_hidden", ignore_index)
    num_valid = int(valid.numel())
    normalizer = _normalizer(num_items_in_batch, num_valid)
    if num_valid == 0:
        return _zero_output(student_hidden, student_head, normalizer, compute_ce_loss)

    hidden = _take_rows(student_hidden.reshape(-1, student_hidden.shape[-1]), valid)
    teacher_flat = teacher_input.detach().reshape(-1, teacher_input.shape[-1])
    if teacher_logits is None:
        teacher_flat = _take_rows(teacher_flat, valid)
    if backend in ("liger", "auto"):
        reason = liger_unavailable(
            loss_type, hidden.device, student_head, teacher_head if teacher_logits is None else None, kd_ratio,
            shared_vocab_size,
        )  # fmt: skip
        if reason is None:
            return _liger_output(
                hidden, student_head, teacher_flat, teacher_head, loss_type, temperature, jsd_beta,
                _temperature_factor(loss_type, temperature, scale_by_temperature_squared), normalizer,
            )  # fmt: skip
        if backend == "liger":
            raise ValueError(
                f"backend='liger' cannot compute this loss: {reason}. Use backend='auto' (it falls back to the "
                "compiled kernel) or 'compiled'."
            )
    rows = padded_rows(num_valid, chunk_size)
    vocab_guess = teacher_logits.shape[-1] if teacher_logits is not None else _head_vocab(teacher_head)
    if use_compiled(backend, rows, vocab_guess, hidden.device):
        return _compiled_chunked_loss(
            hidden, student_head, teacher_flat, teacher_head if teacher_logits is None else None, valid,
            valid_labels, rows, normalizer, shared_vocab_size, loss_type, temperature, jsd_beta, skew_alpha,
            scale_by_temperature_squared, kd_ratio, compute_ce_loss, fused_backward, backend,
        )  # fmt: skip
    teacher_row_sums: list[Tensor] = []

    def kd_value_and_grad(
        student_logits: Tensor, start: int, end: int, need_grad: bool
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None, int]:
        if teacher_logits is not None:
            teacher_chunk = teacher_flat.index_select(0, valid[start:end])
        else:
            teacher_chunk = teacher_head(teacher_flat[start:end])
        student_vocab = student_logits.shape[-1]
        vocab = _resolve_vocab(student_vocab, teacher_chunk.shape[-1], shared_vocab_size)
        teacher_chunk = teacher_chunk[..., :vocab].to(student_logits.dtype)
        # one cheap reduction per chunk: the row sums are finite iff the teacher's logits are; a non-finite
        # teacher is reported after the loop (a single host sync)
        teacher_row_sums.append(teacher_chunk.sum(-1))
        divergence = _divergence_and_logit_grad(
            student_logits[..., :vocab], teacher_chunk, loss_type, temperature, jsd_beta, skew_alpha,
            scale_by_temperature_squared, need_grad,
        )  # fmt: skip
        teacher_entropy = divergence.teacher_entropy
        if teacher_entropy is None:
            teacher_entropy = _entropy_from_logits(teacher_chunk)
        grad = runner.student_logit_grad(divergence, vocab, student_vocab)
        return divergence.values, grad, teacher_chunk.argmax(-1), teacher_entropy, divergence.student_entropy, vocab

    runner = _ChunkRunner(valid_labels, chunk_size, kd_ratio, compute_ce_loss, kd_value_and_grad)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    _check_finite_teacher_rows(
        teacher_row_sums, "teacher_logits" if teacher_logits is not None else "the teacher head's logits"
    )
    return runner.output(total_sum, normalizer)


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """`tensor` with its last row repeated up to `rows` rows (finite padding: masked rows must not produce NaN)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def _compiled_chunked_loss(
    hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_flat: Tensor,
    teacher_head: Callable[[Tensor], Tensor] | None,
    valid: Tensor,
    valid_labels: Tensor,
    rows: int,
    normalizer: int | Tensor,
    shared_vocab_size: int | None,
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    skew_alpha: float,
    scale_by_temperature_squared: bool | None,
    kd_ratio: float,
    compute_ce_loss: bool,
    fused_backward: bool,
    backend: str,
) -> DistillationLossOutput:
    """[`chunked_distillation_loss`] through the compiled kernel: every chunk padded to `rows` rows."""
    num_valid = hidden.shape[0]
    padded = -(-num_valid // rows) * rows
    hidden = F.pad(hidden, (0, 0, 0, padded - num_valid))
    if teacher_head is not None:
        teacher_rows = _pad_rows(teacher_flat, padded)
    else:
        teacher_rows = _pad_rows(valid, padded)  # indices into the teacher's logits
    chunks = KernelChunks(
        backend, loss_type, temperature, jsd_beta, skew_alpha,
        _temperature_factor(loss_type, temperature, scale_by_temperature_squared), kd_ratio, compute_ce_loss,
        num_valid, _pad_rows(valid_labels, padded),
    )  # fmt: skip

    def kernel_chunk(student_logits: Tensor, start: int, end: int) -> tuple:
        if teacher_head is not None:
            teacher = teacher_head(teacher_rows[start:end])
        else:
            teacher = teacher_flat.index_select(0, teacher_rows[start:end])
        vocab = _resolve_vocab(student_logits.shape[-1], teacher.shape[-1], shared_vocab_size)
        return chunks.run(student_logits, teacher.to(student_logits.dtype), start, end, vocab)

    runner = _KernelRunner(valid_labels, rows, kd_ratio, compute_ce_loss, num_valid, kernel_chunk)
    total_sum = _run_chunks(hidden, runner, student_head, fused_backward)
    _check_finite_teacher_rows(
        runner.teacher_row_sums, "teacher_logits" if teacher_head is None else "the teacher head's logits"
    )
    return runner.output(total_sum, normalizer)


def _liger_output(
    hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_hidden: Tensor,
    teacher_head: Callable[[Tensor], Tensor],
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    factor: float,
    normalizer: int | Tensor,
) -> DistillationLossOutput:
    """The loss through Liger-Kernel (`liger.py`): no statistics (NaN) and no cross-entropy log there."""
    kd_sum = liger_kd_sum(hidden, student_head, teacher_hidden, teacher_head, loss_type, temperature, jsd_beta, factor)
    statistics = _Statistics()
    statistics.top1_matches = statistics.teacher_entropy = statistics.student_entropy = float("nan")
    return _finish(kd_sum.detach(), None, kd_sum, normalizer, hidden.shape[0], statistics)
