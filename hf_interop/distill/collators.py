"""How rows become batches for `DistillationTrainer`: padding, the cached teacher columns, generated continuations.

Labels are not shifted: position `i` of the logits predicts `labels[i + 1]`; -100 marks what no loss sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .teacher_cache.format import IDS_COLUMN, LOGPROBS_COLUMN, PAD_LOGPROB, TAIL_COLUMN

IGNORE_INDEX = -100
# what `TeacherLogitsCache.collate` returns (the loss inputs); the dataset columns are `cache.columns`
TEACHER_CACHE_COLUMNS = (IDS_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN)


def mask_generated_continuations(
    sequences: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    eos_token_id: int | list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and labels for `generate` outputs: prompt masked, continuation kept up to its first EOS.

    Args:
        sequences (`torch.Tensor` of shape `(batch, prompt_length + new_tokens)`):
            What `generate` returned: the (left-padded) prompts followed by the continuations.
        prompt_attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`):
            Attention mask of the prompts (0 on left padding).
        eos_token_id (`int` or `list[int]`, *optional*):
            End-of-sequence id(s). The first EOS of a continuation stays a target (the student learns to stop);
            everything after it is masked out of both attention and labels.

    Returns:
        `(attention_mask, labels)`, both shaped like `sequences`; labels are -100 on the prompt and after EOS.
    """
    prompt_length = prompt_attention_mask.shape[1]
    continuation = sequences[:, prompt_length:]
    if eos_token_id is None:
        after_eos = torch.zeros_like(continuation, dtype=torch.bool)
    else:
        eos_ids = torch.as_tensor(eos_token_id, device=sequences.device).reshape(-1)
        is_eos = torch.isin(continuation, eos_ids)
        # strictly after the first EOS: some EOS occurred at an earlier position
        after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    continuation_mask = (~after_eos).long()
    attention_mask = torch.cat([prompt_attention_mask.long().to(sequences.device), continuation_mask], dim=1)
    labels = sequences.clone()
    labels[:, :prompt_length] = IGNORE_INDEX
    labels[:, prompt_length:] = continuation.masked_fill(after_eos, IGNORE_INDEX)
    return attention_mask, labels


def _left_padded_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    default_prompt_length: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts to continue, left-padded for `generate`.

    A row whose labels mask a leading prompt (prompt/completion data: the first target is at position > 1) uses
    that prompt; other rows (plain language-model text) use their first `default_prompt_length` tokens.
    """
    batch_size, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = []
    for row in range(batch_size):
        prompt_length = min(default_prompt_length, length - 1)
        if labels is not None:
            targets = (labels[row, 1:] != IGNORE_INDEX).nonzero()
            if len(targets) and int(targets[0]) + 1 > 1:
                prompt_length = int(targets[0]) + 1
        tokens = input_ids[row, :prompt_length][attention_mask[row, :prompt_length].bool()]
        prompts.append(tokens)
    width = max(max(len(tokens) for tokens in prompts), 1)
    prompt_ids = input_ids.new_full((batch_size, width), pad_token_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, tokens in enumerate(prompts):
        if len(tokens):
            prompt_ids[row, width - len(tokens) :] = tokens
            prompt_mask[row, width - len(tokens) :] = 1
    return prompt_ids, prompt_mask


class _PaddingCollator:
    """Right-pads `input_ids` (pad id), `attention_mask` (0) and `labels` (-100); labels default to the inputs."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        width = max(lengths)
        batch: dict[str, torch.Tensor] = {}
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            mask = feature.get("attention_mask")
            attention_mask[row, : len(ids)] = torch.as_tensor(mask, dtype=torch.long) if mask is not None else 1
            row_labels = feature.get("labels")
            labels[row, : len(ids)] = torch.as_tensor(row_labels, dtype=torch.long) if row_labels is not None else ids
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        for key in features[0]:
            if key in batch:
                continue
            values = [feature[key] for feature in features]
            try:
                batch[key] = torch.as_tensor(values)
            except (TypeError, ValueError, RuntimeError):
                continue  # strings and ragged extras are not model inputs
        return batch


class _TeacherCacheCollator:
    """Collates the training rows with `base`, then adds the cached teacher columns through the cache's collate."""

    def __init__(self, base: Callable, cache: Any) -> None:
        self.base = base
        self.cache = cache

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        columns = _cache_dataset_columns(self.cache)
        plain = [{key: value for key, value in f.items() if key not in columns} for f in features]
        batch = dict(self.base(plain))
        if all(column in features[0] for column in columns):  # evaluation rows may carry no cache
            batch.update(self.cache.collate(features))
            if "labels" in batch:
                # a position without any entry has no teacher distribution (a served teacher that did not answer
                # it): no loss sees it, and the Trainer's count of valid targets leaves it out
                missing = (batch[LOGPROBS_COLUMN] <= PAD_LOGPROB / 2).all(-1)
                batch["labels"][:, 1:] = batch["labels"][:, 1:].masked_fill(missing, IGNORE_INDEX)
        return batch


def _cache_dataset_columns(cache: Any) -> tuple[str, ...]:
    return tuple(getattr(cache, "columns", TEACHER_CACHE_COLUMNS))
