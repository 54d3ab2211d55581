"""`MultiTaskModel`: one causal-LM backbone shared by several tasks, with a small head for each task that needs one.

A causal-LM task uses the backbone's own output head (next-token cross-entropy); a `classification` task a linear
head over the final hidden state of each row's last real token (as `AutoModelForSequenceClassification` does); a
`regression` task the same with one output and a mean squared error. Saved as `backbone/` (the backbone's own
`save_pretrained`: a full model or a PEFT adapter), `task_heads.safetensors` and `multitask_config.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_TYPES = ("causal_lm", "classification", "regression")
CONFIG_NAME = "multitask_config.json"
HEADS_NAME = "task_heads.safetensors"


@dataclass
class TaskOutput:
    """What a task's forward returns: `loss` (0-d, a mean over the batch's targets) and `logits`."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None


def check_head_specs(heads: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Normalised `{task: {"type": ..., "num_labels": ...}}`, or a `ValueError` naming the task and the fix."""
    specs = {}
    for task, spec in (heads or {}).items():
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, dict) or spec.get("type") not in HEAD_TYPES:
            raise ValueError(
                f"head of task {task!r} is {spec!r}; give {{'type': one of {list(HEAD_TYPES)}, 'num_labels': N}}."
            )
        head_type = spec["type"]
        num_labels = int(spec.get("num_labels", 1 if head_type == "regression" else 0))
        if head_type == "classification" and num_labels < 2:
            raise ValueError(f"classification head of task {task!r} needs num_labels >= 2, got {num_labels}.")
        if head_type == "regression":
            num_labels = 1
        specs[task] = (
            {"type": head_type, "num_labels": num_labels} if head_type != "causal_lm" else {"type": head_type}
        )
    return specs


def _hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size of {type(backbone).__name__}'s config; pass a causal LM.")


class MultiTaskModel(nn.Module):
    r"""
    A shared causal-LM backbone with per-task heads.

    Args:
        backbone (`PreTrainedModel` or `PeftModel`):
            The shared causal LM (optionally wrapped with LoRA adapters).
        heads (`dict[str, dict]`, *optional*):
            Task name to head: `{"type": "classification", "num_labels": 3}`, `{"type": "regression"}` or
            `{"type": "causal_lm"}` (the backbone's LM head). Tasks not listed are causal-LM tasks.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_specs = check_head_specs(heads)
        hidden = _hidden_size(backbone)
        dtype = next(backbone.parameters()).dtype
        self.task_heads = nn.ModuleDict(
            {
                task: nn.Linear(hidden, spec["num_labels"], dtype=dtype)
                for task, spec in self.head_specs.items()
                if spec["type"] != "causal_lm"
            }
        )
        self.config = getattr(backbone, "config", None)

    def task_type(self, task: str) -> str:
        return self.head_specs.get(task, {"type": "causal_lm"})["type"]

    def num_labels(self, task: str) -> int | None:
        return self.head_specs.get(task, {}).get("num_labels")

    def forward(
        self,
        task: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> TaskOutput:
        head_type = self.task_type(task)
        if head_type == "causal_lm":
            outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
            return TaskOutput(loss=outputs.loss, logits=outputs.logits)
        extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(self.backbone) else {}
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **extra
        )
        hidden = outputs.hidden_states[-1]
        if attention_mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:  # rows are right-padded: the last real token
            last = attention_mask.sum(dim=-1).clamp(min=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        head = self.task_heads[task]
        logits = head(pooled.to(head.weight.dtype))
        loss = None
        if labels is not None:
            if head_type == "classification":
                loss = nn.functional.cross_entropy(logits.float(), labels.long())
            else:
                loss = nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
        return TaskOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `backbone/`, `task_heads.safetensors` and `multitask_config.json` into `save_directory`."""
        from safetensors.torch import save_file

        from ..utils import atomic_write_json

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder / "backbone", **kwargs)
        if kwargs.get("is_main_process", True):
            tensors = {
                name: tensor.detach().cpu().contiguous() for name, tensor in self.task_heads.state_dict().items()
            }
            temporary = folder / f".{HEADS_NAME}.tmp"
            save_file(tensors, str(temporary), metadata={"format": "pt"})
            os.replace(temporary, folder / HEADS_NAME)
            atomic_write_json(folder / CONFIG_NAME, {"heads": self.head_specs, "backbone": "backbone"})

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, base_model: nn.Module | str | None = None, **kwargs: Any
    ) -> MultiTaskModel:
        """Load what :meth:`save_pretrained` wrote (`kwargs` go to the backbone's `from_pretrained`).

        When the backbone was saved as a PEFT adapter, `base_model` (a model or a path) is the model the adapter
        goes on; it defaults to the adapter config's `base_model_name_or_path`.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"{str(folder)!r} holds no {CONFIG_NAME}; it is not a saved MultiTaskModel.")
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        backbone = _load_backbone(folder / config.get("backbone", "backbone"), base_model, **kwargs)
        model = cls(backbone, config.get("heads"))
        model.task_heads.load_state_dict(load_file(str(folder / HEADS_NAME)))
        return model

    def load_task_state(self, folder: str | os.PathLike) -> None:
        """Load saved weights into this model in place (resuming a checkpoint): heads and the backbone's weights."""
        from safetensors.torch import load_file

        folder = Path(folder)
        self.task_heads.load_state_dict(load_file(str(folder / HEADS_NAME)))
        backbone_folder = folder / "backbone"
        if (backbone_folder / "adapter_config.json").is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.backbone, load_file(str(backbone_folder / "adapter_model.safetensors")))
        else:
            from transformers.modeling_utils import load_state_dict

            files = sorted(backbone_folder.glob("*.safetensors"))
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_state_dict(str(file)))
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            tied = set(getattr(self.backbone, "_tied_weights_keys", None) or [])
            if unexpected or [name for name in missing if name not in tied and "lm_head" not in name]:
                raise ValueError(
                    f"checkpoint {str(folder)!r} does not match the backbone: {missing[:3]}{unexpected[:3]}"
                )


def _load_backbone(folder: Path, base_model: nn.Module | str | None, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not (folder / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    from peft import PeftModel

    if base_model is None:
        base_model = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_model or not (os.path.isdir(base_model) or "/" in base_model):
            raise ValueError(
                f"the backbone in {str(folder)!r} is a PEFT adapter whose base model ({base_model!r}) cannot be "
                "found; pass base_model=<the model or its folder> to MultiTaskModel.from_pretrained."
            )
    if isinstance(base_model, (str, os.PathLike)):
        base_model = AutoModelForCausalLM.from_pretrained(str(base_model), **kwargs)
    return PeftModel.from_pretrained(base_model, str(folder), is_trainable=True)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
