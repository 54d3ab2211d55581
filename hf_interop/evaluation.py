"""Held-out evaluation of causal LMs: perplexity and throughput, used by the demo, callbacks and reports."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from datasets import Dataset


def _model_device(model: torch.nn.Module) -> torch.device:
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 8,
    show_progress: bool = True,
    description: str = "Perplexity",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Token-level negative log-likelihood and perplexity of `model` on packed blocks.

    Every target token with label != -100 counts once (causal shift: position t predicts label t+1), so the
    result does not depend on `batch_size`.

    Args:
        model (`torch.nn.Module`): a causal LM whose forward returns `.logits`.
        dataset (`Dataset`): rows with `input_ids` and optionally `labels` / `attention_mask` (see
            :func:`hf_interop.pack_dataset`).
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar.
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `dict` with `loss` (mean NLL in nats per token), `perplexity`, `num_tokens`, `tokens_per_second`.
    """
    import torch
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("evaluate_perplexity got an empty dataset; pack some text first (hf_interop.pack_dataset).")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    num_batches = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    start = time.perf_counter()
    with torch.no_grad():
        for batch_index in tqdm(range(num_batches), desc=description, disable=not show_progress, leave=False):
            rows = dataset[batch_index * batch_size : (batch_index + 1) * batch_size]
            input_ids = torch.tensor(rows["input_ids"], device=device)
            labels = torch.tensor(rows["labels"] if "labels" in rows else rows["input_ids"], device=device)
            attention_mask = torch.tensor(rows["attention_mask"], device=device) if "attention_mask" in rows else None
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
            )
            total_nll += nll.double().cpu()
            total_tokens += int((shift_labels != -100).sum())
    elapsed = time.perf_counter() - start
    if was_training:
        model.train()
    mean_nll = (total_nll / max(total_tokens, 1)).item()
    return {
        "loss": mean_nll,
        "perplexity": math.exp(mean_nll),
        "num_tokens": total_tokens,
        "tokens_per_second": total_tokens / elapsed if elapsed > 0 else float("inf"),
    }
