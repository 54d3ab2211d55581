"""On-policy (`lmbda`) and sequence-level (`seq_kd`) distillation: which steps generate, and what they train on."""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .collators import _left_padded_prompts, mask_generated_continuations
from .model_utils import _base_model, _first_device, _pad_token_id, _tokenizer_of

if TYPE_CHECKING:
    from .distillation_config import DistillationConfig


def _draws_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step `step` trains on student-generated text: a draw seeded by `(seed, step)` alone, so all
    accumulation micro-batches of a step agree and resumed runs draw the same."""
    return random.Random(seed * 1_000_003 + step).random() < lmbda


def _build_generation_config(model: nn.Module, processing_class: Any, args: DistillationConfig) -> Any:
    """Sampling settings of generated steps, from `args`; EOS from the model's generation config, else the tokenizer."""
    from transformers import GenerationConfig

    tokenizer = _tokenizer_of(processing_class) if processing_class is not None else None
    base = _base_model(model)
    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        top_k=args.generation_top_k,
        pad_token_id=_pad_token_id(model, processing_class),
        eos_token_id=eos,
        use_cache=True,
    )


@torch.no_grad()
def _generate_continuations(
    generating: nn.Module, inputs: dict[str, Any], config: Any, prompt_length: int, disable_adapter: bool
) -> dict[str, Any]:
    """`input_ids`, `attention_mask` and `labels` of each row's prompt continued by `generating` (in eval mode).

    `disable_adapter` generates with a PeftModel's adapters switched off (the teacher of self-distillation).
    """
    prompt_ids, prompt_mask = _left_padded_prompts(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        inputs.get("labels"),
        prompt_length,
        config.pad_token_id,
    )
    device = _first_device(generating)
    was_training = generating.training
    generating.eval()
    try:
        context = generating.disable_adapter() if disable_adapter else contextlib.nullcontext()
        with context:
            sequences = generating.generate(
                input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), generation_config=config
            )
    finally:
        generating.train(was_training)
    sequences = sequences.to(inputs["input_ids"].device)
    attention_mask, labels = mask_generated_continuations(sequences, prompt_mask, config.eos_token_id)
    return {"input_ids": sequences, "attention_mask": attention_mask, "labels": labels}


def _generate_batch_for(trainer: Any, model: nn.Module, inputs: dict[str, Any], generator: str) -> dict[str, Any]:
    """`trainer`'s batch with its continuations replaced by text that `generator` ("student" or "teacher") samples:
    by a server when one serves that model (`student_generation_url`, or a served teacher), else in-process."""
    from .served_teacher.online import served_continuations

    server = trainer.generation_server if generator == "student" else trainer.served_teacher
    config = trainer._generation_config
    if server is not None:
        prompt_ids, prompt_mask = _left_padded_prompts(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            inputs.get("labels"),
            trainer.args.generation_prompt_length,
            config.pad_token_id,
        )
        # seeded per step (like the on-policy draw), so a resumed run asks for the same samples
        seed = trainer.args.seed * 1_000_003 + trainer.state.global_step
        batch = served_continuations(server, server.tokenizer, prompt_ids, prompt_mask, config, seed)
        return {name: value.to(inputs["input_ids"].device) for name, value in batch.items()}
    if generator == "student" or trainer.self_distillation:
        generating = trainer.accelerator.unwrap_model(model)
    else:
        generating = trainer.accelerator.unwrap_model(trainer.teacher_model)
    return _generate_continuations(
        generating,
        inputs,
        config,
        trainer.args.generation_prompt_length,
        disable_adapter=generator == "teacher" and trainer.self_distillation,
    )
