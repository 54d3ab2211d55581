"""The hidden-state loss of `DistillationTrainer`: learned projections from the student's width to the teacher's."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback


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
