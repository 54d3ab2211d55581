"""Output heads: the function that turns final hidden states of a causal LM into its logits, as its forward does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch import Tensor


class OutputHead(nn.Module):
    """hidden `(..., hidden)` -> logits `(..., vocab)` of a causal LM: its output embeddings plus post-processing.

    Holds a reference to the model's own output-embedding module (so gradients reach `lm_head`, or the input
    embeddings when they are tied), then applies the family's logit post-processing in the order the model does:
    a multiplier (`logit_scale` of Cohere, `output_multiplier`, `logits_scaling` of HyperCLOVA X), a divisor
    (`logits_scaling` of Granite), then final-logit softcapping `cap * tanh(logits / cap)` (Gemma 2/3).
    """

    def __init__(
        self,
        output_embeddings: nn.Module,
        multiplier: float | None = None,
        divisor: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.output_embeddings = output_embeddings
        self.multiplier = multiplier
        self.divisor = divisor
        self.softcap = softcap

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = self.output_embeddings(hidden_states)
        if self.multiplier is not None and self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor is not None and self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier}, divisor={self.divisor}, softcap={self.softcap}"


def output_logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The function that turns final hidden states of `model` into its logits, as its forward does.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`):
            A causal LM; a `PeftModel` is unwrapped (adapters on `lm_head` stay active).

    Returns:
        [`OutputHead`]: an `nn.Module` mapping `(..., hidden)` to `(..., vocab)`. Its parameters are the model's
        own (not copies), so gradients flow into `lm_head` or the tied input embeddings.

    Raises:
        `ValueError`: the model has no output embeddings (e.g. an ensemble: pass its logits instead).
    """
    base = model
    if hasattr(base, "get_base_model") and callable(base.get_base_model):
        base = base.get_base_model()
    output_embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output_embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); pass its "
            "logits as teacher_logits instead of teacher_hidden + teacher_head."
        )
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    model_type = str(getattr(text_config, "model_type", "") or getattr(config, "model_type", ""))
    multiplier = 1.0
    divisor = None
    logit_scale = getattr(base, "logit_scale", None)  # Cohere keeps it on the model
    if isinstance(logit_scale, (int, float)):
        multiplier *= float(logit_scale)
    output_multiplier = getattr(text_config, "output_multiplier", None)
    if isinstance(output_multiplier, (int, float)):
        multiplier *= float(output_multiplier)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)):
        if model_type.startswith("hyperclovax"):
            multiplier *= float(logits_scaling)
        else:  # Granite family divides
            divisor = float(logits_scaling)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return OutputHead(
        output_embeddings,
        multiplier=multiplier if multiplier != 1.0 else None,
        divisor=divisor,
        softcap=float(softcap) if softcap else None,
    )


def _head_parameters(head: Callable[[Tensor], Tensor]) -> list[nn.Parameter]:
    if not isinstance(head, nn.Module):
        return []
    unique: dict[int, nn.Parameter] = {}
    for parameter in head.parameters():
        if parameter.requires_grad:
            unique.setdefault(id(parameter), parameter)
    return list(unique.values())


def _head_vocab(head: Callable[[Tensor], Tensor]) -> int:
    """The vocabulary a head maps to, read from its modules without running it (0 when it cannot tell)."""
    if not isinstance(head, nn.Module):
        return 0
    sizes = [module.out_features for module in head.modules() if isinstance(module, nn.Linear)]
    sizes += [module.num_embeddings for module in head.modules() if isinstance(module, nn.Embedding)]
    return max(sizes, default=0)
