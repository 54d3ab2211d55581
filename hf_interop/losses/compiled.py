"""The compiled per-chunk path of the chunked losses: one `torch.compile`d function per loss configuration.

Between the head's matmuls a chunk of the eager path makes about a dozen passes over `(chunk, vocab)` buffers
(both log-softmaxes, their exponentials, the divergence, its gradient, the cross-entropy, the statistics). Here
that whole stretch is one function, [`_chunk_kernel`], compiled by inductor (C++/OpenMP on CPU, Triton on CUDA): it
reads the student's and the teacher's chunk logits and writes the gradient w.r.t. the student's logits, with the
per-token divergence, cross-entropy, entropies and argmaxes as small outputs. The head's matmuls stay the BLAS calls
of eager mode (inductor would call the same `mm` on CPU); its gradient goes through the head as before. Forward KL
(the default loss) is written as row reductions ([`_forward_kl_kernel`]), which inductor turns into three passes
over the chunk and one written buffer; the log-softmax form it decomposes into stores shifted copies and reads them
back (on a 2-core CPU that halved the kernel's time: 101 to 61 ms per 256 x 49,152 chunk).

Shapes stay static: every chunk is padded to the same number of rows (the padded rows are masked: zero loss, zero
gradient), so a training run compiles each configuration once. Scalars (temperature, weights) are passed as a small
tensor, so they are no recompilation reason either; only the loss type and a few flags are baked in, and each such
configuration gets its own code object (dynamo's cache and its recompile limit are per code object).

Backends (`backend=` of the chunked losses, `DistillationConfig.loss_backend`): `"eager"`, `"compiled"`, `"liger"`
(CUDA, see `liger.py`) and `"auto"`: Liger where it applies, else the compiled kernel when a chunk is big enough to
repay the compilation (`_AUTO_MIN_ELEMENTS`), else eager. When compilation fails, `"auto"` warns once and runs the
eager path (same loss, slower); `"compiled"` raises, naming the reason.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hf_interop.logging_utils import get_logger

from .names import LOSS_BACKENDS

if TYPE_CHECKING:
    from torch import Tensor

logger = get_logger(__name__)

# "auto" compiles when a padded chunk holds at least this many logits (e.g. 512 tokens x a 32k vocabulary): a first
# compilation costs seconds to tens of seconds, which a chunk of that size repays within a few training steps
_AUTO_MIN_ELEMENTS = 1 << 24
# smallest padded chunk; fewer valid tokens than the chunk size pad to the next power of two (a few shapes at most)
_MIN_PADDED_ROWS = 16


def _check_backend(backend: str) -> None:
    if backend not in LOSS_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not a loss backend; use one of {list(LOSS_BACKENDS)} ('auto' picks the fastest "
            "available)."
        )


def padded_rows(num_valid: int, chunk_size: int) -> int:
    """Rows of every compiled chunk: `chunk_size`, or the next power of two when all tokens fit in one chunk."""
    if num_valid >= chunk_size:
        return chunk_size
    return min(chunk_size, max(_MIN_PADDED_ROWS, 1 << (num_valid - 1).bit_length()))


# --------------------------------------------------------------------------------------------------------------
# the kernel


@dataclass(frozen=True)
class _KernelSpec:
    """What is baked into one compiled kernel (everything else is a tensor input)."""

    loss_type: str
    vocab: int  # compared columns (a prefix of the student's)
    teacher_normalized: bool  # the teacher comes as log-probabilities at the temperature (sparse forms with a prior)
    unit_temperature: bool  # statistics reuse the divergence's log-softmaxes
    compute_ce: bool
    mix_ce: bool  # the gradient includes the cross-entropy's (kd_ratio < 1)
    teacher_statistics: bool
    sparse: bool = False  # the k+1 bucket form against a cached teacher (`_sparse_chunk_kernel`)


# indices into the scalars tensor
_INV_T, _FACTOR, _BETA, _ALPHA, _KD_RATIO = range(5)


def _row_sum(x: Tensor) -> Tensor:
    return x.sum(-1)


def _moments(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row statistics of `z` as reductions only: `(max, sum of exp(z - max), sum of exp(z - max) * (z - max))`,
    each `(rows, 1)`. Written this way inductor computes all three in two reading passes and stores no shifted copy
    of `z` (its log-softmax decomposition materialises `z - max` and reads it back)."""
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    e = shifted.exp()
    return top, e.sum(-1, keepdim=True), torch.where(e > 0, e * shifted, 0.0).sum(-1, keepdim=True)


def _forward_kl_kernel(spec: _KernelSpec, logits: Tensor, teacher: Tensor, labels: Tensor, mask: Tensor, scalars):
    """Forward KL (the default loss) in reduction form: per row `KL = sum_v p_v (y_v - x_v) - lse(y) + lse(x)` with
    `x, y` the tempered logits, so one pass reads both chunks for the maxima (and the argmaxes, row sums), one for
    the sums, and one writes the gradient `softmax(x) - softmax(y)`: three passes and one written buffer, where the
    log-softmax form makes about eight passes and writes three (the difference is most of the kernel's time on a
    CPU). Same values and outputs as `_chunk_kernel`."""
    inv_t, factor, kd_ratio = scalars[_INV_T], scalars[_FACTOR], scalars[_KD_RATIO]
    compared = logits[:, : spec.vocab]
    teacher = teacher[:, : spec.vocab]
    x = compared * inv_t
    y = teacher * inv_t
    # the weighted sums feed the entropies at temperature 1; otherwise they are dead code, dropped by inductor
    x_top, x_sum, x_weighted = _moments(x)
    y_top, y_sum, y_weighted = _moments(y)
    y_shifted = y - y_top
    p_unnormalized = y_shifted.exp()  # the same expression as in `_moments`: inductor computes it once per pass
    x_lse = x_top + x_sum.log()
    y_lse = y_top + y_sum.log()
    # sum_v p_v ((y_v - y_top) - (x_v - x_top)): the shifted differences stay small where the two agree
    cross = torch.where(p_unnormalized > 0, p_unnormalized * (y_shifted - (x - x_top)), 0.0).sum(-1, keepdim=True)
    values = (cross / y_sum - y_sum.log() + x_sum.log()).squeeze(-1)
    grad = (x - x_lse).exp() - (y - y_lse).exp()
    values = values * factor * mask
    grad = grad * (factor * inv_t)
    if spec.vocab < logits.shape[-1]:
        grad = F.pad(grad, (0, logits.shape[-1] - spec.vocab))
    # statistics at temperature 1: reuse the sums above when the divergence ran at temperature 1
    if spec.unit_temperature:
        s_top, s_sum, s_weighted = x_top, x_sum, x_weighted
    else:
        s_top, s_sum, s_weighted = _moments(compared)
    student_entropy = (s_sum.log() - s_weighted / s_sum).squeeze(-1)
    if spec.teacher_statistics:
        if spec.unit_temperature:
            t_sum, t_weighted = y_sum, y_weighted
        else:
            _, t_sum, t_weighted = _moments(teacher)
        teacher_entropy = (t_sum.log() - t_weighted / t_sum).squeeze(-1)
        teacher_argmax = teacher.argmax(-1)
    else:
        teacher_entropy = values.new_zeros(values.shape)
        teacher_argmax = labels
    ce = values.new_zeros(values.shape)
    if spec.compute_ce or spec.mix_ce:
        if spec.vocab == logits.shape[-1]:
            full_lse = s_top + s_sum.log()
        else:
            full_top = logits.amax(-1, keepdim=True)
            full_lse = full_top + (logits - full_top).exp().sum(-1, keepdim=True).log()
        if spec.compute_ce:
            ce = (full_lse.squeeze(-1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)) * mask
            if spec.mix_ce:
                one_hot = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
                grad = kd_ratio * grad + (1.0 - kd_ratio) * ((logits - full_lse).exp() - one_hot.to(logits.dtype))
        else:
            grad = kd_ratio * grad
    return (
        grad * mask.unsqueeze(-1), values, ce, student_entropy, teacher_entropy, compared.argmax(-1), teacher_argmax,
        _row_sum(teacher),
    )  # fmt: skip


def _chunk_kernel(spec: _KernelSpec, logits: Tensor, teacher: Tensor, labels: Tensor, mask: Tensor, scalars: Tensor):
    """One chunk: `(grad w.r.t. logits, kd, ce, student entropy, teacher entropy, student argmax, teacher argmax,
    teacher row sums)`. Same math as `divergences._divergence_and_logit_grad` and `_ChunkRunner`'s cross-entropy;
    rows where `mask` is 0 get zero values and gradients."""
    if spec.loss_type == "forward_kl" and not spec.teacher_normalized:
        return _forward_kl_kernel(spec, logits, teacher, labels, mask, scalars)
    inv_t, factor, beta, alpha, kd_ratio = (scalars[i] for i in range(5))
    compared = logits[:, : spec.vocab]
    teacher = teacher[:, : spec.vocab]
    loss_type = spec.loss_type
    s_logits = compared * inv_t
    values: Tensor
    if loss_type == "mse":
        difference = s_logits - teacher * inv_t
        values = _row_sum(difference * difference) / spec.vocab
        grad = difference * (2.0 / spec.vocab)
        s = t = None
    else:
        s = F.log_softmax(s_logits, dim=-1)
        t = teacher if spec.teacher_normalized else F.log_softmax(teacher * inv_t, dim=-1)
        q = s.exp()
        p = t.exp()
        if loss_type == "forward_kl":
            values = _row_sum(torch.where(p > 0, p * (t - s), 0.0))
            grad = q - p
        elif loss_type == "reverse_kl":
            log_ratio = s - t
            values = _row_sum(q * log_ratio)
            grad = q * (log_ratio - values.unsqueeze(-1))
        elif loss_type == "jsd":
            # 0 < beta < 1 here: the mixture from the probabilities (one log, where logaddexp takes an exp and a
            # log1p); an entry where both underflow holds no mass and is masked, as 0 * log 0 = 0
            m = torch.log(beta * p + (1.0 - beta) * q)
            kl_teacher = _row_sum(torch.where(p > 0, p * (t - m), 0.0))
            log_ratio = torch.where(q > 0, s - m, 0.0)
            kl_student = _row_sum(q * log_ratio)
            values = beta * kl_teacher + (1.0 - beta) * kl_student
            grad = q * (log_ratio - kl_student.unsqueeze(-1)) * (1.0 - beta)
        elif loss_type in ("skew_kl", "skew_reverse_kl"):
            m = torch.logaddexp(t + torch.log(alpha), s + torch.log1p(-alpha))
            if loss_type == "skew_kl":
                values = _row_sum(torch.where(p > 0, p * (t - m), 0.0))
                weighted = -(1.0 - alpha) * p * (s - m).exp()
            else:
                log_ratio = s - m
                values = _row_sum(q * log_ratio)
                weighted = q * log_ratio + q - (1.0 - alpha) * q * log_ratio.exp()
            grad = weighted - q * _row_sum(weighted).unsqueeze(-1)
        elif loss_type == "tvd":
            difference = q - p
            values = 0.5 * _row_sum(difference.abs())
            weighted = 0.5 * q * difference.sign()
            grad = weighted - q * _row_sum(weighted).unsqueeze(-1)
        else:  # checked before any compilation
            raise ValueError(f"loss_type={loss_type!r} has no compiled kernel.")
    values = values * factor * mask
    grad = grad * (factor * inv_t)
    if spec.vocab < logits.shape[-1]:
        grad = F.pad(grad, (0, logits.shape[-1] - spec.vocab))
    # statistics at temperature 1 (the divergence's log-softmaxes when it ran at temperature 1)
    s1 = s if spec.unit_temperature and s is not None else F.log_softmax(compared, dim=-1)
    if spec.teacher_statistics:
        t1 = t if spec.unit_temperature and t is not None else F.log_softmax(teacher, dim=-1)
        teacher_entropy = -_row_sum(t1.exp() * torch.where(t1.exp() > 0, t1, 0.0))
        teacher_argmax = teacher.argmax(-1)
    else:
        teacher_entropy = values.new_zeros(values.shape)
        teacher_argmax = labels
    grad, ce, student_entropy = _with_cross_entropy(spec, logits, s1, grad, labels, mask, kd_ratio)
    return grad, values, ce, student_entropy, teacher_entropy, compared.argmax(-1), teacher_argmax, _row_sum(teacher)


def _with_cross_entropy(
    spec: _KernelSpec, logits: Tensor, s1: Tensor, grad: Tensor, labels: Tensor, mask: Tensor, kd_ratio: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`(grad with the cross-entropy's share, per-token cross-entropy, student entropy)`; padded rows zeroed."""
    student_entropy = -_row_sum(s1.exp() * s1)
    ce = student_entropy.new_zeros(student_entropy.shape)
    if spec.compute_ce:
        full = s1 if spec.vocab == logits.shape[-1] else F.log_softmax(logits, dim=-1)
        ce = -full.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
        if spec.mix_ce:
            one_hot = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
            ce_grad = full.exp() - one_hot.to(full.dtype)
            grad = kd_ratio * grad + (1.0 - kd_ratio) * ce_grad
    elif spec.mix_ce:
        grad = kd_ratio * grad
    return grad * mask.unsqueeze(-1), ce, student_entropy


def _sparse_chunk_kernel(
    spec: _KernelSpec,
    logits: Tensor,
    ids: Tensor,
    kept: Tensor,
    top_index: Tensor,
    teacher_buckets: Tensor,
    labels: Tensor,
    mask: Tensor,
    scalars: Tensor,
):
    """One chunk against a cached top-k teacher as k+1 buckets (`sparse._sparse_divergence_and_logit_grad`):
    `(grad w.r.t. logits, kd, ce, student entropy, student argmax)`. The student's tail bucket is the log-sum-exp
    of its log-probabilities outside the ids (exact at any magnitude); the bucket gradient `g` is in closed form."""
    inv_t, factor, beta, kd_ratio = scalars[_INV_T], scalars[_FACTOR], scalars[_BETA], scalars[_KD_RATIO]
    compared = logits[:, : spec.vocab]
    lp = F.log_softmax(compared * inv_t, dim=-1)
    lowest = torch.finfo(lp.dtype).min
    student_top = lp.gather(-1, ids).where(kept, lowest)
    student_tail = torch.logsumexp(lp.scatter(-1, ids, lowest), dim=-1)
    b = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    t = teacher_buckets
    q = b.exp()
    p = t.exp()
    loss_type = spec.loss_type
    if loss_type == "forward_kl":
        values = _row_sum(torch.where(p > 0, p * (t - b), 0.0))
        g = -p
    elif loss_type == "reverse_kl":
        log_ratio = torch.where(q > 0, b - t, 0.0)
        values = _row_sum(q * log_ratio)
        g = q * (log_ratio + 1.0)
    elif loss_type == "jsd":
        m = torch.logaddexp(t + torch.log(beta), b + torch.log1p(-beta))
        kl_teacher = _row_sum(torch.where(p > 0, p * (t - m), 0.0))
        log_ratio = torch.where(q > 0, b - m, 0.0)
        values = beta * kl_teacher + (1.0 - beta) * _row_sum(q * log_ratio)
        g = (1.0 - beta) * q * log_ratio
    elif loss_type == "tvd":
        values = 0.5 * _row_sum((q - p).abs())
        g = 0.5 * (q - p).sign() * q
    else:  # checked before any compilation
        raise ValueError(f"loss_type={loss_type!r} has no sparse compiled kernel.")
    g = g * factor
    total = _row_sum(g).unsqueeze(-1)
    k = ids.shape[-1]
    id_grad = g[:, :k] - student_top.exp() * total
    id_grad = torch.where(kept, id_grad, id_grad.gather(-1, top_index))
    # outside the ids: q_v (g_tail / Q_tail - G), with q_v / Q_tail taken in log space (no overflow)
    grad = (lp - student_tail.unsqueeze(-1)).exp() * g[:, k:] - lp.exp() * total
    grad = grad.scatter(-1, ids, id_grad) * inv_t
    values = values * factor * mask
    if spec.vocab < logits.shape[-1]:
        grad = F.pad(grad, (0, logits.shape[-1] - spec.vocab))
    s1 = lp if spec.unit_temperature else F.log_softmax(compared, dim=-1)
    grad, ce, student_entropy = _with_cross_entropy(spec, logits, s1, grad, labels, mask, kd_ratio)
    return grad, values, ce, student_entropy, compared.argmax(-1)


# --------------------------------------------------------------------------------------------------------------
# compilation, once per configuration, with the eager fallback


class _CompileState:
    kernels: dict[_KernelSpec, Any] = {}  # noqa: RUF012 (process-wide cache)
    failure: str | None = None  # why compilation failed in this process (then "auto" stays eager)
    compiles = 0  # configurations compiled in this process (tests count recompilations with dynamo's counters)


def _own_code(spec: _KernelSpec):
    """`_chunk_kernel` bound to `spec`, as a function with its own code object (its own dynamo cache)."""
    kernel = _sparse_chunk_kernel if spec.sparse else _chunk_kernel
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}_{spec.loss_type}_{len(_CompileState.kernels)}")
    function = types.FunctionType(code, kernel.__globals__, code.co_name, None, None)

    def bound(*tensors: Tensor):
        return function(spec, *tensors)

    bound.__code__ = bound.__code__.replace(co_name=f"{code.co_name}_bound")
    return bound


def _compiled_kernel(spec: _KernelSpec):
    kernel = _CompileState.kernels.get(spec)
    if kernel is None:
        kernel = torch.compile(_own_code(spec), dynamic=False, fullgraph=True)
        _CompileState.kernels[spec] = kernel
        _CompileState.compiles += 1
    return kernel


def compilation_unavailable() -> str | None:
    """Why `torch.compile` cannot run here (`None` when it can; a failure seen earlier in the process counts)."""
    if _CompileState.failure is not None:
        return _CompileState.failure
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python version"
    except Exception as error:  # noqa: BLE001
        return f"torch._dynamo failed to import ({type(error).__name__}: {error})"
    return None


def _run_kernel(spec: _KernelSpec, backend: str, *tensors: Tensor):
    """The compiled kernel's outputs; on a compilation failure: raise (`backend="compiled"`) or warn once and run
    the same function eagerly (`"auto"`)."""
    reason = compilation_unavailable()
    if reason is None:
        try:
            return _compiled_kernel(spec)(*tensors)
        except Exception as error:  # noqa: BLE001 (inductor raises many types: compiler missing, codegen, ...)
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            _CompileState.failure = reason
    if backend == "compiled":
        raise RuntimeError(
            f"loss backend 'compiled' was requested but torch.compile failed: {reason}. Install a C++ compiler "
            "(CPU) or Triton (CUDA), or use backend='auto' (falls back to eager with a warning) or 'eager'."
        )
    logger.warning_once(
        f"The compiled loss kernel is unavailable ({reason}); the chunked loss runs eagerly (same values, slower). "
        "Set loss_backend='eager' to silence this."
    )
    return (_sparse_chunk_kernel if spec.sparse else _chunk_kernel)(spec, *tensors)


def use_compiled(backend: str, rows: int, vocab: int, device: torch.device) -> bool:
    """Whether the chunked loss takes the compiled kernel for `rows x vocab` chunks under `backend`."""
    if backend == "compiled":
        return True
    if backend != "auto" or device.type not in ("cpu", "cuda"):
        return False
    return compilation_unavailable() is None and rows * vocab >= _AUTO_MIN_ELEMENTS


# --------------------------------------------------------------------------------------------------------------
# the runner's side


class KernelChunks:
    """Feeds padded chunks to the kernel: holds the scalars, the padded labels and the number of real rows."""

    def __init__(
        self,
        backend: str,
        loss_type: str,
        temperature: float,
        jsd_beta: float,
        skew_alpha: float,
        factor: float,
        kd_ratio: float,
        compute_ce_loss: bool,
        num_valid: int,
        labels: Tensor,
        teacher_normalized: bool = False,
        teacher_statistics: bool = True,
    ) -> None:
        if loss_type == "jsd" and jsd_beta in (0.0, 1.0):
            loss_type = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"
        self.backend = backend
        self.loss_type = loss_type
        self.unit_temperature = temperature == 1.0
        self.compute_ce = compute_ce_loss
        self.mix_ce = kd_ratio != 1.0
        self.teacher_normalized = teacher_normalized
        self.teacher_statistics = teacher_statistics
        self.num_valid = num_valid
        self.labels = labels
        self.scalars = torch.tensor(
            [1.0 / temperature, factor, jsd_beta, skew_alpha, kd_ratio], dtype=torch.float64, device=labels.device
        )
        self._masks: dict[tuple[int, int], Tensor] = {}

    def mask(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """1 for the real rows of the padded chunk `[start, end)`, 0 for padding (no host sync: all Python ints)."""
        real = max(0, min(end, self.num_valid) - start)
        key = (end - start, real)
        if key not in self._masks:
            mask = torch.zeros(end - start, dtype=dtype, device=self.labels.device)
            mask[:real] = 1.0
            self._masks[key] = mask
        return self._masks[key]

    def real_rows(self, start: int, end: int) -> int:
        return max(0, min(end, self.num_valid) - start)

    def _spec(self, vocab: int, sparse: bool) -> _KernelSpec:
        return _KernelSpec(
            loss_type=self.loss_type,
            vocab=vocab,
            teacher_normalized=self.teacher_normalized,
            unit_temperature=self.unit_temperature,
            compute_ce=self.compute_ce,
            mix_ce=self.mix_ce,
            teacher_statistics=self.teacher_statistics and not sparse,
            sparse=sparse,
        )

    def run(self, logits: Tensor, teacher: Tensor, start: int, end: int, vocab: int):
        """Dense kernel: `(grad, kd, ce, student entropy, teacher entropy, student argmax, teacher argmax, teacher
        row sums)` of the padded chunk `[start, end)`."""
        return _run_kernel(
            self._spec(vocab, sparse=False), self.backend, logits, teacher, self.labels[start:end],
            self.mask(start, end, logits.dtype), self.scalars.to(logits.dtype),
        )  # fmt: skip

    def run_sparse(
        self, logits: Tensor, ids: Tensor, kept: Tensor, top_index: Tensor, teacher_buckets: Tensor, start: int,
        end: int, vocab: int,
    ):  # fmt: skip
        """Sparse bucket kernel: `(grad, kd, ce, student entropy, student argmax)` of the padded chunk."""
        return _run_kernel(
            self._spec(vocab, sparse=True), self.backend, logits, ids, kept, top_index, teacher_buckets,
            self.labels[start:end], self.mask(start, end, logits.dtype), self.scalars.to(logits.dtype),
        )  # fmt: skip
