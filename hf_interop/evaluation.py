"""Held-out evaluation of causal LMs: perplexity, throughput and the statistics of next-token predictions (NLL, KL
and top-1 agreement to a reference, mixtures), used by the demo, callbacks and reports."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from datasets import Dataset


def model_device(model: Any) -> torch.device:
    """Device a model's inputs go to: its `device` attribute, else its first parameter not on `meta`, else CPU.

    Works for any object with a `device` (an ensemble, a wrapped model), not only for `torch.nn.Module`s.
    """
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.device.type != "meta":
                return parameter.device
    return torch.device("cpu")


_model_device = model_device  # the private name other modules imported before the public one


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
    device = model_device(model)
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


def prediction_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Sums over the valid positions of one batch: NLL of the labels and, with a reference, KL and top-1 agreement.

    Causal shift: position `t` of `logits` predicts `labels[:, t + 1]`. Sums (not means) are returned so batches add
    up exactly; divide by `num_tokens` at the end. Positions are processed `chunk_size` at a time, so the float32
    temporaries stay at a few `(chunk_size, vocab)` buffers whatever the batch (49k-token vocabularies included).

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)`): the model's logits.
        labels (`torch.Tensor` of shape `(batch, seq)`): target ids, `ignore_index` where nothing is scored.
        reference_logits (`torch.Tensor` of shape `(batch, seq, vocab)`, *optional*): the reference model's logits or
            log-probabilities at the same positions (an ensemble returns log-probabilities; softmax is the same).
        temperature (`float`, *optional*, defaults to 1.0): both logits are divided by it for the KL.
        ignore_index (`int`, *optional*, defaults to -100): label value of positions that are not scored.
        chunk_size (`int`, *optional*, defaults to 1024): positions per chunk.

    Returns:
        `dict` of float64 scalars: `nll_sum`, `num_tokens`, and with a reference `kl_sum` (KL(reference || model) in
        nats) and `agreement_count` (positions where both argmaxes agree).
    """
    import torch

    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:].to(shift_logits.device)
    valid = shift_labels != ignore_index
    if reference_logits is not None and reference_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"reference logits have vocabulary {reference_logits.shape[-1]} but the model's have {logits.shape[-1]}; "
            "the reference model must share the model's vocabulary (same tokenizer and vocab_size)."
        )
    selected_logits = shift_logits[valid]
    targets = shift_labels[valid]
    selected_reference = (
        reference_logits[:, :-1].to(shift_logits.device)[valid] if reference_logits is not None else None
    )
    zero = torch.zeros((), dtype=torch.float64, device=shift_logits.device)
    statistics = {"nll_sum": zero.clone(), "num_tokens": valid.sum().double()}
    if selected_reference is not None:
        statistics.update(kl_sum=zero.clone(), agreement_count=zero.clone())
    for start in range(0, selected_logits.shape[0], chunk_size):
        chunk = selected_logits[start : start + chunk_size].float()
        log_probs = torch.log_softmax(chunk, dim=-1)
        statistics["nll_sum"] -= log_probs.gather(-1, targets[start : start + chunk_size, None]).double().sum()
        if selected_reference is None:
            continue
        reference = selected_reference[start : start + chunk_size].float()
        if temperature != 1.0:
            log_probs = torch.log_softmax(chunk / temperature, dim=-1)
        reference_log_probs = torch.log_softmax(reference / temperature, dim=-1)
        kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1)
        statistics["kl_sum"] += kl.double().sum()
        statistics["agreement_count"] += (chunk.argmax(-1) == reference.argmax(-1)).double().sum()
    return statistics


def target_log_probs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability (float64) the model gives each valid next token, flattened over the batch in row order."""
    import torch

    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != ignore_index
    log_probs = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)
    return log_probs.gather(-1, shift_labels[valid].unsqueeze(-1)).squeeze(-1).double().cpu()


def ensemble_log_probs(member_log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the average probability of several models (a uniform mixture): logsumexp_k(log p_k) - log K."""
    import torch

    stacked = torch.stack(list(member_log_probs))
    return torch.logsumexp(stacked, dim=0) - math.log(stacked.shape[0])
