"""The Trainer subclasses that train one member of a boosted ensemble.

- :class:`SampleWeightedTrainer`: multiplies a `sample_weight` column into each example's loss (classifiers: the
  example's cross-entropy; causal LMs: each target token of the example), normalised by the item count of the whole
  optimizer batch (all gradient-accumulation steps, all processes) times the training set's mean item weight, so one
  batch of 8 and four accumulation steps of 2 give the same gradient, and every step is an unbiased estimate of the
  weighted training objective `sum(w * loss) / sum(w)`: a batch of low-weight examples moves the model little (a
  batch's own weight sum as the normaliser would give it a full step, and 0 / 0 for an all-zero batch).
- :class:`AdditiveBoostingTrainer`: trains a new causal LM, the earlier members frozen, on the cross-entropy of their
  product-of-experts combination (:func:`~hf_interop.ensemble.boosting_math.additive_token_losses`).
- :class:`WeightedExampleCollator`: pads token ids, labels and `sample_weight` for both tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .boosting_math import additive_token_losses, check_sample_weight, weighted_loss

TASKS = ("causal_lm", "sequence_classification")


class WeightedExampleCollator:
    """Right-pads `input_ids`/`attention_mask`; classification labels from `label`/`labels`, causal-LM labels from
    `labels` (or the input ids, padding -100); carries `sample_weight` as float32 when the examples have it."""

    def __init__(self, pad_token_id: int, task: str):
        if task not in TASKS:
            raise ValueError(f"task={task!r} must be one of {TASKS}.")
        self.pad_token_id = int(pad_token_id)
        self.task = task

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        token_labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            if self.task == "causal_lm":
                labels = feature.get("labels")
                token_labels[row, : len(ids)] = ids if labels is None else torch.as_tensor(labels, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == "causal_lm":
            batch["labels"] = token_labels
        else:
            key = "labels" if "labels" in features[0] else "label"
            batch["labels"] = torch.tensor([int(feature[key]) for feature in features], dtype=torch.long)
        if "sample_weight" in features[0]:
            batch["sample_weight"] = torch.tensor([float(f["sample_weight"]) for f in features], dtype=torch.float32)
        return batch


def per_item_losses(
    logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor | None, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of every item and its weight: examples for classifiers, shifted target tokens for causal LMs."""
    if task == "sequence_classification":
        losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        weights = torch.ones_like(losses) if sample_weight is None else sample_weight.to(losses)
        return losses, weights
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    losses = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view_as(targets)
    row_weights = torch.ones(targets.shape[0], device=losses.device) if sample_weight is None else sample_weight
    return losses, row_weights.to(losses)[:, None] * mask


def target_counts(dataset: Any):
    """Target tokens of every causal-LM example (float64 array): its `labels` past the first that are not -100, or
    `len(input_ids) - 1` without a labels column (what the collator and the losses count)."""
    import numpy as np

    if "labels" in dataset.column_names:
        return np.asarray([sum(1 for t in row[1:] if t != -100) for row in dataset["labels"]], dtype=np.float64)
    return np.asarray([max(0, len(ids) - 1) for ids in dataset["input_ids"]], dtype=np.float64)


def mean_item_weight(dataset: Any, task: str) -> float:
    """The mean weight of the items of `dataset` (examples; causal LMs: target tokens, each with its example's
    weight), 1.0 without a `sample_weight` column. Raises when the weights are not finite, negative or all zero."""
    if dataset is None or "sample_weight" not in getattr(dataset, "column_names", ()):
        return 1.0
    weights = check_sample_weight(dataset["sample_weight"], len(dataset), "train_dataset column 'sample_weight'")
    if task == "causal_lm":
        counts = target_counts(dataset)
        if counts.sum() <= 0:
            raise ValueError("the training set holds no target token; causal-LM examples need >= 2 tokens.")
        return float((weights * counts).sum() / counts.sum())
    return float(weights.mean())


class SampleWeightedTrainer(Trainer):
    """A `Trainer` whose optimizer step minimises `sum(w_i * loss_i) / (n * mean_w)` over the whole optimizer batch
    (`n` items, `mean_w` the training set's mean item weight): in expectation the weighted training objective.

    Args:
        task (`str`, *optional*, defaults to `"sequence_classification"`): `"sequence_classification"` (one loss per
            example) or `"causal_lm"` (every target token of an example carries the example's weight).
        Everything else as `transformers.Trainer`. Examples without a `sample_weight` column weigh 1.
    """

    def __init__(self, *args: Any, task: str = "sequence_classification", **kwargs: Any):
        if task not in TASKS:
            raise ValueError(f"task={task!r} must be one of {TASKS}.")
        self.task = task
        super().__init__(*args, **kwargs)
        self.mean_item_weight = mean_item_weight(self.train_dataset, task)
        # The loss is already divided by the normaliser of every accumulation step; Trainer must not divide again.
        self.loss_is_scaled_for_ga = True

    def _set_signature_columns_if_needed(self) -> None:
        # Overridden so that `remove_unused_columns` keeps `sample_weight`, which the model's forward does not take.
        super()._set_signature_columns_if_needed()
        if "sample_weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "sample_weight"]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        # Overridden (private hook, the one Trainer consults for the loss normaliser of an optimizer step): the
        # normaliser is the item count of every batch of the step, summed over processes, times the training set's
        # mean item weight (a count, so it never depends on which examples a batch drew, and is never zero).
        total = torch.zeros((), dtype=torch.float64)
        for batch in batch_samples:
            labels = batch["labels"]
            if self.task == "causal_lm":
                total += (labels[:, 1:] != -100).sum().double().cpu()
            else:
                total += labels.shape[0]
        total = total.to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return (total * self.mean_item_weight).clamp_min(torch.finfo(torch.float64).tiny)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        sample_weight = inputs.pop("sample_weight", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses, item_weights = self.item_losses(outputs, labels, sample_weight, inputs)
        loss = weighted_loss(losses, item_weights, None if num_items_in_batch is None else num_items_in_batch)
        if num_items_in_batch is not None and self.args.world_size > 1:
            # DDP averages gradients over processes; the normaliser already sums over them.
            loss = loss * self.args.world_size
        loss = loss.float()
        return (loss, outputs) if return_outputs else loss

    def item_losses(
        self, outputs: Any, labels: torch.Tensor, sample_weight: torch.Tensor | None, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return per_item_losses(outputs.logits, labels, sample_weight, self.task)


class AdditiveBoostingTrainer(SampleWeightedTrainer):
    """Trains a new causal LM member against frozen earlier members combined as a product of experts.

    Args:
        frozen_ensemble (`EnsembleForCausalLM`): the earlier members (`combination="product"`); its forward gives their
            combined log-probabilities, computed without gradients.
        new_weight (`float`): the new member's share `eta` in `log_softmax((1 - eta) * F + eta * log p_new)`.
    """

    def __init__(self, *args: Any, frozen_ensemble: torch.nn.Module, new_weight: float, **kwargs: Any):
        if not 0.0 < new_weight <= 1.0:
            raise ValueError(f"new_weight={new_weight!r} must lie in (0, 1].")
        kwargs.setdefault("task", "causal_lm")
        super().__init__(*args, **kwargs)
        self.frozen_ensemble = frozen_ensemble
        self.new_weight = float(new_weight)

    def item_losses(
        self, outputs: Any, labels: torch.Tensor, sample_weight: torch.Tensor | None, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            frozen = self.frozen_ensemble(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
        vocab_size = frozen.shape[-1]
        new_logits = outputs.logits[..., :vocab_size]
        losses, mask = additive_token_losses(
            frozen[:, :-1].to(new_logits.device), new_logits[:, :-1], labels[:, 1:], self.new_weight
        )
        row_weights = torch.ones(labels.shape[0], device=losses.device) if sample_weight is None else sample_weight
        return losses, row_weights.to(losses)[:, None] * mask
