"""What the distillation trainers ask of a model object, PEFT-wrapped or not: base model, config, vocabulary size,
output head, forward arguments, device, name and the tokenizer saved next to it."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep plain models working without it
        return False
    return isinstance(model, PeftModel)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (the same object otherwise)."""
    if _is_peft_model(model):
        return model.get_base_model()
    return model


def _text_config(model: nn.Module) -> Any:
    config = getattr(_base_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _vocab_size(model: nn.Module) -> int:
    """Rows of the output head (which may be padded beyond the tokenizer), else `config.vocab_size`."""
    base = _base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0:
        return int(weight.shape[0])
    return int(_text_config(model).vocab_size)


def _has_output_head(model: nn.Module) -> bool:
    base = _base_model(model)
    return hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None


def _accepts_argument(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(_base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def _model_name(model: nn.Module) -> str | None:
    base = _base_model(model)
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _first_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def _tokenizers_agree(first: Any, second: Any) -> bool:
    """Whether every token of the smaller vocabulary has the same id in the other (added tokens may extend one)."""
    first_vocab, second_vocab = first.get_vocab(), second.get_vocab()
    small, large = (
        (first_vocab, second_vocab) if len(first_vocab) <= len(second_vocab) else (second_vocab, first_vocab)
    )
    return all(large.get(token) == index for token, index in small.items())


def _tokenizer_next_to(model: nn.Module) -> Any:
    """The tokenizer saved in the folder the model was loaded from, if any."""
    name = _model_name(model)
    if not name or not os.path.isdir(name):
        return None
    try:
        from ..loading import load_tokenizer

        return load_tokenizer(name)
    except Exception:  # no tokenizer files there: the caller asks for teacher_processing_class when it matters
        return None


def _pad_token_id(model: nn.Module, processing_class: Any) -> int:
    """The tokenizer's pad (else EOS) id, else the model config's, else 0."""
    tokenizer = _tokenizer_of(processing_class) if processing_class is not None else None
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(_text_config(model), "pad_token_id", None),
        getattr(_text_config(model), "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def _without_tied_copies(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` keeping one name per tied parameter (e.g. `model.embed_tokens.weight`, not `lm_head.weight`).

    A state dict gathered from FSDP shards holds a separate tensor for every name of a tied parameter, so
    `save_pretrained`, which recognises tied weights by shared memory, would save each copy.
    """
    first_names: dict[int, str] = {}
    copies = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_names:
            copies.add(name)
        else:
            first_names[id(parameter)] = name
    return {name: tensor for name, tensor in state_dict.items() if name not in copies}
