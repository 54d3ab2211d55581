"""The live teacher of `DistillationTrainer`: loading by name, placement on devices, its head on another device."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .distillation_config import DistillationConfig


class _DeviceBridgeHead(nn.Module):
    """A teacher head on another device: moves each hidden chunk there and its logits back."""

    def __init__(self, head: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.head = head
        self.head_device = device

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(hidden_states.to(self.head_device)).to(hidden_states.device)


def _infer_device_map(name_or_path: str, args: DistillationConfig) -> dict[str, Any]:
    """A device map for `teacher_device_map="auto"` that respects `teacher_max_memory` (computed on meta weights)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..utils import resolve_dtype

    gguf_file = None
    folder = name_or_path
    if name_or_path.endswith(".gguf"):
        folder, gguf_file = os.path.dirname(name_or_path) or ".", os.path.basename(name_or_path)
    config = AutoConfig.from_pretrained(folder, revision=args.teacher_revision, gguf_file=gguf_file)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    dtype = resolve_dtype(args.teacher_dtype)
    return infer_auto_device_map(
        skeleton,
        max_memory=args.teacher_max_memory,
        no_split_module_classes=skeleton._no_split_modules,
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )


def _dispatch(model: nn.Module, device_map: Any, max_memory: dict | None) -> nn.Module:
    """Place an already-loaded teacher with Accelerate (a model object plus `teacher_device_map`)."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return model.to(device_map[""])
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return model.to(device_map)
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=getattr(model, "_no_split_modules", None)
        )
    if set(device_map.values()) <= {"cpu"} or set(device_map.values()) <= {torch.device("cpu")}:
        return model.to("cpu")
    return dispatch_model(model, device_map=device_map)
