"""The Liger-Kernel backend of [`chunked_distillation_loss`]: its fused linear generalized JSD (Triton, CUDA only).

`liger_kernel.transformers.LigerFusedLinearJSD` fuses both heads' matmuls with the generalized JSD of GKD
(`beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`, `m = beta p_t + (1 - beta) p_s`; `beta = 0` is forward KL and
`beta = 1` reverse KL), so it covers `forward_kl`, `reverse_kl` and `jsd`. It applies where the loss is exactly that
divergence: CUDA tensors, both heads plain bias-free linear layers (no scaling, no softcapping), the teacher given as
hidden states and head, the whole vocabulary compared and no cross-entropy share in the gradient (`kd_ratio=1`).
Liger returns only the loss: the statistics (`top1_agreement`, entropies) are NaN and `ce_loss` is `None` there.

Install with `pip install 'hf_interop[liger-kernel]'`. Results equal ours within bfloat16 tolerance (tested on a
GPU: `tests/losses/test_compiled_loss.py::test_compiled_and_liger_match_eager_on_cuda`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .names import LIGER_LOSS_TYPES

if TYPE_CHECKING:
    from torch import Tensor

LIGER_EXTRA_HINT = "pip install 'hf_interop[liger-kernel]'"
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def _plain_weight(head: Callable | None) -> Tensor | None:
    from .heads import OutputHead

    if type(head) is OutputHead and not (head.multiplier or head.divisor or head.softcap):
        head = head.output_embeddings
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    return None


def liger_unavailable(
    loss_type: str,
    device: torch.device,
    student_head: Callable,
    teacher_head: Callable | None,
    kd_ratio: float,
    shared_vocab_size: int | None,
) -> str | None:
    """Why Liger's fused loss cannot compute this loss exactly (`None` when it can); cheapest checks first."""
    if loss_type not in LIGER_LOSS_TYPES:
        return f"Liger-Kernel has no {loss_type!r} loss (it fuses {list(LIGER_LOSS_TYPES)})"
    if device.type != "cuda":
        return f"Liger-Kernel's Triton kernels need CUDA tensors (these are on {device.type})"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"Liger-Kernel is not installed ({LIGER_EXTRA_HINT})"
    if teacher_head is None:
        return "Liger-Kernel needs the teacher's hidden states and head, not precomputed teacher_logits"
    student_weight, teacher_weight = _plain_weight(student_head), _plain_weight(teacher_head)
    if student_weight is None or teacher_weight is None:
        return "Liger-Kernel needs both heads to be plain bias-free linear layers (no scaling or softcapping)"
    if student_weight.shape[0] != teacher_weight.shape[0] or shared_vocab_size not in (None, student_weight.shape[0]):
        return "Liger-Kernel compares whole vocabularies of one size (no shared_vocab_size prefix)"
    if kd_ratio != 1.0:
        return f"Liger-Kernel's fused JSD has no cross-entropy share (kd_ratio={kd_ratio}; it needs 1.0)"
    return None


def liger_kd_sum(
    hidden: Tensor,
    student_head: Callable,
    teacher_hidden: Tensor,
    teacher_head: Callable,
    loss_type: str,
    temperature: float,
    jsd_beta: float,
    factor: float,
) -> Tensor:
    """The divergence summed over the rows of `hidden` (all valid), through `LigerFusedLinearJSD`."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    beta = _LIGER_BETA.get(loss_type, jsd_beta)
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(
        hidden, _plain_weight(student_head), teacher_hidden.to(hidden.dtype), _plain_weight(teacher_head)
    )
    # Liger averages over the rows it was given
    return loss.float() * (hidden.shape[0] * factor)
