"""Real-text tasks the multi-task tests share, built from the builtin corpus (Python's language reference) and the
corpus tokenizer: two language-modelling tasks on different documents and a classification task over paragraphs."""

from __future__ import annotations

from datasets import Dataset

from hf_interop import MultiTaskConfig, pack_dataset

BLOCK = 32


def task_datasets(corpus, tokenizer) -> tuple[dict, dict]:
    """`({task: train rows}, {task: eval rows})`: `reference_a` / `reference_b` (packed blocks of two halves of the
    documents) and `topic` (a paragraph's first 24 tokens; label 1 when the title of its document, a section of the
    language reference, starts with a letter from n on)."""
    train, held_out = corpus["train"], corpus["validation"]
    half = len(train) // 2
    tasks = {
        "reference_a": pack_dataset(train.select(range(half)), tokenizer, block_size=BLOCK, max_blocks=48),
        "reference_b": pack_dataset(train.select(range(half, len(train))), tokenizer, block_size=BLOCK, max_blocks=96),
        "topic": _paragraph_rows(train, tokenizer, 64),
    }
    evals = {
        "reference_a": pack_dataset(held_out, tokenizer, block_size=BLOCK, max_blocks=8),
        "topic": _paragraph_rows(held_out, tokenizer, 16),
    }
    return tasks, evals


def _paragraph_rows(split, tokenizer, count: int) -> Dataset:
    rows = {"input_ids": [], "labels": []}
    for document in split:
        label = int(document["title"][:1].lower() >= "n")
        for paragraph in document["text"].split("\n\n"):
            ids = tokenizer(paragraph)["input_ids"][:24]
            if len(ids) >= 8:
                rows["input_ids"].append(ids)
                rows["labels"].append(label)
            if len(rows["labels"]) >= count:
                return Dataset.from_dict(rows)
    return Dataset.from_dict(rows)


def make_config(output_dir, **overrides) -> MultiTaskConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return MultiTaskConfig(**settings)
