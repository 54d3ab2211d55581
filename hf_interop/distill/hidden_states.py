"""The hidden-state loss of `DistillationTrainer`: learned projections from the student's width to the teacher's."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback

from .collators import IGNORE_INDEX
from .model_utils import _text_config

if TYPE_CHECKING:
    from .distillation_config import DistillationConfig

PROJECTIONS_FILE = "distillation_projections.safetensors"


class _ProjectionGradients(TrainerCallback):
    """Gradient bookkeeping for the learned hidden-state projections, which live outside the student.

    Keeping them out of the student keeps them out of its saved checkpoint, but also out of what the Trainer manages
    for the model: it zeroes only `model`'s gradients after each optimizer step, and DDP averages only the model's
    gradients across processes. This callback does both for the projections.
    """

    def __init__(self, projections: nn.Module) -> None:
        self.projections = projections

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for parameter in self.projections.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= dist.get_world_size()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


def _check_hidden_layer_map(student: nn.Module, args: DistillationConfig) -> None:
    if args.hidden_loss_weight <= 0 or not args.hidden_layer_map:
        return
    student_layers = int(_text_config(student).num_hidden_layers)
    for student_layer, _ in args.hidden_layer_map:
        if student_layer > student_layers:
            raise ValueError(
                f"hidden_layer_map={args.hidden_layer_map} names student layer {student_layer}, but the student "
                f"has {student_layers} layers; use indices 0..{student_layers} (0 = embedding output)."
            )


def _projections(args: DistillationConfig, student_config: Any, teacher_config: Any, sharded: bool) -> nn.ModuleList:
    """One projection per pair of `args.hidden_layer_map`, on `args.device`: identity for equal widths, else a
    learned linear map from the student's width to the teacher's (refused when `sharded`: DeepSpeed/FSDP)."""
    teacher_width, teacher_layers = int(teacher_config.hidden_size), int(teacher_config.num_hidden_layers)
    student_width = int(student_config.hidden_size)
    projections = nn.ModuleList()
    for _, teacher_layer in args.hidden_layer_map:
        if teacher_layer > teacher_layers:
            raise ValueError(
                f"hidden_layer_map={args.hidden_layer_map} names teacher layer {teacher_layer}, but the teacher "
                f"has {teacher_layers} layers; use indices 0..{teacher_layers} (0 = embedding output)."
            )
        if student_width == teacher_width:
            projections.append(nn.Identity())
        else:
            projections.append(nn.Linear(student_width, teacher_width, bias=False))
    if sharded and any(True for _ in projections.parameters()):
        raise ValueError(
            f"hidden_layer_map={args.hidden_layer_map} needs learned projections (student width {student_width} "
            f"!= teacher width {teacher_width}), which hf_interop does not shard with DeepSpeed/FSDP; map layers of "
            "equal width, set hidden_loss_weight=0, or train without DeepSpeed/FSDP."
        )
    projections.to(args.device)
    return projections


def _hidden_state_loss(
    projections: nn.ModuleList,
    args: DistillationConfig,
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    shift_labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int,
) -> torch.Tensor:
    """Mean over layer pairs of the per-token MSE / (1 - cosine), summed over valid positions / normaliser."""
    valid = shift_labels != IGNORE_INDEX
    total = None
    for projection, (student_layer, teacher_layer) in zip(projections, args.hidden_layer_map, strict=True):
        student = student_states[student_layer][:, :-1][valid]
        weight = getattr(projection, "weight", None)
        student = projection(student.to(weight.dtype if weight is not None else torch.float32))
        teacher = teacher_states[teacher_layer][:, :-1].to(valid.device)[valid].to(student.dtype)
        if args.hidden_loss_type == "cosine":
            per_token = 1.0 - nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1)
        else:
            per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
        total = per_token.sum() if total is None else total + per_token.sum()
    normalizer = num_items_in_batch
    if torch.is_tensor(normalizer):
        normalizer = normalizer.to(total.device, torch.float32).clamp(min=1)
    else:
        normalizer = max(float(normalizer), 1.0)
    return total / normalizer / len(args.hidden_layer_map)


def _save_projections(projections: nn.ModuleList, output_dir: str, hidden_layer_map: list[list[int]]) -> None:
    """Write the learned projections to `output_dir/PROJECTIONS_FILE` (a temporary name, then renamed into place)."""
    from safetensors.torch import save_file

    path = os.path.join(output_dir, PROJECTIONS_FILE)
    tmp_path = f"{path}.tmp"
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in projections.state_dict().items()}
    save_file(tensors, tmp_path, metadata={"hidden_layer_map": str(hidden_layer_map)})
    os.replace(tmp_path, path)


def _load_projections(projections: nn.ModuleList, checkpoint: str, args: DistillationConfig) -> None:
    """Restore the learned projections saved in a checkpoint by `_save_projections`."""
    path = os.path.join(checkpoint, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {checkpoint!r} has no {PROJECTIONS_FILE}, but this run learns hidden-state "
            f"projections (hidden_layer_map={args.hidden_layer_map}); resume from a checkpoint of a run with "
            "the same hidden_layer_map, or start without resume_from_checkpoint."
        )
    from safetensors.torch import load_file

    projections.load_state_dict(load_file(path, device=str(args.device)))
