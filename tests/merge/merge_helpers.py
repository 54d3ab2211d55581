"""Helpers of the merge tests of the newer methods, coefficient fitting and mergekit agreement."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from hf_interop import load_causal_lm


def perturbed_copy(source_dir, target_dir, seed: int, scale: float):
    """`source_dir`'s model plus seeded Gaussian noise of std `scale`, saved with its tokenizer to `target_dir`."""
    model, tokenizer = load_causal_lm(source_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    return target_dir


def load_state(folder) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state
