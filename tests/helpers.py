"""Builders shared by the test modules (tiny random causal LMs of several families) and a log capture."""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_config(family: str, vocab_size: int, **overrides):
    """A tiny config of `family` (hidden 64, 2 layers) with `vocab_size`; `overrides` replace any field."""
    if family == "llama":
        base = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        base.update(overrides)
        return LlamaConfig(vocab_size=vocab_size, **base)
    if family == "qwen2":
        base = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        base.update(overrides)
        return Qwen2Config(vocab_size=vocab_size, **base)
    if family == "gpt2":
        base = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, tie_word_embeddings=True)
        base.update(overrides)
        return GPT2Config(vocab_size=vocab_size, **base)
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def build_tiny_causal_lm(family: str, vocab_size: int, seed: int = 0, tokenizer=None, **overrides):
    """A seeded tiny random causal LM in float32, eval mode, with pad/eos ids taken from `tokenizer`."""
    config = tiny_config(family, vocab_size, **overrides)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@contextlib.contextmanager
def transformers_log():
    """Collect the messages transformers logs inside the block, once-only warnings included (their cache is
    cleared first: an earlier test may already have used them up)."""
    from transformers.utils import logging as hf_logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    transformers_logger = hf_logging.get_logger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()
    try:
        yield messages
    finally:
        transformers_logger.removeHandler(handler)


def make_distillation_args(output_dir, config_class=None, **overrides):
    """A small CPU `DistillationConfig` (or `config_class`, a subclass) for trainer tests (2 steps, no saving, no
    reports); `overrides` win."""
    from hf_interop import DistillationConfig

    settings = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    settings.update(overrides)
    return (config_class or DistillationConfig)(**settings)
