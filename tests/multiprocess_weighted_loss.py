"""Launched by `tests/ensemble/test_bagging_boosting_training.py` under `torchrun --nproc_per_node 2`: one optimizer
step of `SampleWeightedTrainer` on 8 weighted examples (2 per device, 2 accumulation steps, 2 processes); rank 0
writes the updated weights to OUT_FILE. `train_one_step` is also what the test runs in one process, batch 8.

Usage: multiprocess_weighted_loss.py OUT_FILE
"""

from __future__ import annotations

import sys

WEIGHTS = [0.0, 1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 1.0]


def build_classifier():
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config)


def weighted_examples():
    from datasets import Dataset

    rows = [[1 + (3 * i + j) % 60 for j in range(4 + i % 3)] for i in range(8)]
    return Dataset.from_dict({"input_ids": rows, "label": [i % 3 for i in range(8)], "sample_weight": WEIGHTS})


def train_one_step(output_dir: str, batch_size: int, accumulation: int):
    from hf_interop.ensemble.bagging import BaggingConfig
    from hf_interop.ensemble.weighted_trainer import SampleWeightedTrainer, WeightedExampleCollator

    model = build_classifier()
    args = BaggingConfig(
        output_dir=output_dir,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = SampleWeightedTrainer(
        model=model,
        args=args,
        train_dataset=weighted_examples(),
        data_collator=WeightedExampleCollator(0, "sequence_classification"),
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    import torch

    trainer = train_one_step(sys.argv[1] + ".work", batch_size=2, accumulation=2)
    if trainer.args.world_size != 2:
        raise SystemExit(f"expected 2 processes, got {trainer.args.world_size}")
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save({name: value.detach().cpu() for name, value in model.named_parameters()}, sys.argv[1])
