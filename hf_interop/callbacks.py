"""`transformers.TrainerCallback`s for distillation and fine-tuning runs; each works with a plain `Trainer`.

- :class:`HeldOutEvaluationCallback`: at every evaluation, held-out perplexity and, given a reference model (a teacher
  or an ensemble), top-1 agreement and KL divergence to it, added to the evaluation logs.
- :class:`CheckpointEnsembleCallback`: keeps the last K saved checkpoints and reports the held-out perplexity of their
  logit ensemble and of their weight average next to the latest checkpoint's.
- :class:`ModelCardCallback`: writes or updates `README.md` (a model card) in every checkpoint it saves.
- :class:`HubPushCallback`: checks Hub access before the first step, then pushes each checkpoint to a branch.
- :class:`ParameterScheduleCallback` (and the shortcuts :func:`temperature_schedule`, :func:`kd_ratio_schedule`):
  change a training knob such as the distillation temperature or `kd_ratio` at every step.

Metrics that a callback adds to an evaluation end up in the dict `trainer.evaluate()` returns (so
`metric_for_best_model` can use them), in `trainer.state.log_history` and in the console logs. Reporting integrations
(TensorBoard, W&B, ...) receive a log before user callbacks run; to have them record these metrics too, put the callback
first: `trainer.callback_handler.callbacks.insert(0, callback)`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .evaluation import ensemble_log_probs, prediction_statistics, target_log_probs
from .logging_utils import get_logger
from .utils import atomic_write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import TrainerState, TrainingArguments

logger = get_logger(__name__)

# Keys the Trainer adds to every evaluation's metrics (speed measurements, not model quality).
_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


# ----------------------------------------------------------------------------------------------------------------
# Pure math: parameter schedules (the statistics of next-token predictions live in evaluation.py)
# ----------------------------------------------------------------------------------------------------------------


def scheduled_value(
    step: int, total_steps: int, start: float, end: float, schedule: str = "linear", num_stages: int = 4
) -> float:
    """Value of a knob at `step` of `total_steps`, moving from `start` (step 0) to `end` (last step).

    Args:
        schedule (`str`): `"constant"` (always `start`), `"linear"`, `"cosine"` (half cosine, flat at both ends) or
            `"step"` (`num_stages` plateaus of equal length, values evenly spaced from `start` to `end`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; use one of {', '.join(SCHEDULES)}.")
    if schedule == "constant":
        return float(start)
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "linear":
        fraction = progress
    elif schedule == "cosine":
        fraction = (1.0 - math.cos(math.pi * progress)) / 2.0
    else:
        if num_stages < 2:
            raise ValueError(f"num_stages={num_stages} must be >= 2 for a step schedule (1 stage is 'constant').")
        # Equal plateaus in steps: stage k covers steps [k * total / N, (k + 1) * total / N).
        stage = min(max(step, 0) * num_stages // max(total_steps, 1), num_stages - 1)
        fraction = stage / (num_stages - 1)
    return float(start + (end - start) * fraction)


SCHEDULES = ("constant", "linear", "cosine", "step")


# ----------------------------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------------------------


def _check_heldout_dataset(dataset: Any, argument: str) -> None:
    if dataset is None or not hasattr(dataset, "column_names") or "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{argument} must be a datasets.Dataset with an `input_ids` column (e.g. from hf_interop.pack_dataset); "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{argument} is empty; pack some held-out text (hf_interop.pack_dataset).")


def _heldout_batches(dataset: Dataset, batch_size: int, max_batches: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Rows of a packed held-out dataset as CPU tensors, `batch_size` at a time (labels -100 where the mask is 0)."""
    import torch

    num_batches = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for index in range(num_batches):
        rows = dataset[index * batch_size : (index + 1) * batch_size]
        input_ids = torch.tensor(rows["input_ids"])
        labels = torch.tensor(rows["labels"]) if "labels" in rows else input_ids.clone()
        attention_mask = torch.tensor(rows["attention_mask"]) if "attention_mask" in rows else None
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _forward_logits(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    from .evaluation import model_device

    device = model_device(model)
    mask = batch["attention_mask"]
    return model(
        input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device) if mask is not None else None
    ).logits


def _is_evaluation_log(logs: Mapping[str, Any], prefix: str) -> bool:
    # `Trainer.evaluate` always adds `{prefix}_runtime` (`{prefix}_{dataset}_runtime` with several eval datasets).
    return any(key.startswith(f"{prefix}_") and key.endswith("_runtime") for key in logs)


def _add_to_logs(state: TrainerState, logs: dict[str, Any], values: Mapping[str, float]) -> None:
    """Add `values` to the log being emitted and to the entry the Trainer already stored in `log_history`."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


def _check_positive_int(value: Any, argument: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a positive integer.")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


class HeldOutEvaluationCallback(TrainerCallback):
    """At every evaluation, held-out perplexity of the model and its top-1 agreement and KL to a reference model.

    The numbers are added to the Trainer's evaluation logs as `{prefix}_heldout_loss`, `{prefix}_heldout_perplexity`
    and, with a reference, `{prefix}_top1_agreement` and `{prefix}_kl_to_reference` (KL(reference || model), nats
    per token) plus `{prefix}_reference_perplexity` (computed once: the reference does not change).

    Args:
        eval_dataset (`datasets.Dataset`):
            Held-out blocks with `input_ids` (and optionally `attention_mask`, `labels`), e.g. from
            :func:`hf_interop.pack_dataset`. Every target with label != -100 counts once (causal shift).
        reference_model (`torch.nn.Module`, *optional*):
            A teacher or an `EnsembleForCausalLM` sharing the model's vocabulary. It stays where it is (its device) and
            is never trained.
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        max_batches (`int`, *optional*): evaluate on at most this many batches.
        temperature (`float`, *optional*, defaults to 1.0): temperature of the KL.
        metric_key_prefix (`str`, *optional*, defaults to `"eval"`): prefix of the Trainer's evaluation keys.

    Example:
        ```python
        trainer = Trainer(model=student, args=args, train_dataset=train, eval_dataset=valid,
                          callbacks=[HeldOutEvaluationCallback(valid, reference_model=teacher)])
        metrics = trainer.evaluate()  # includes eval_heldout_perplexity, eval_top1_agreement, eval_kl_to_reference
        ```
    """

    def __init__(
        self,
        eval_dataset: Dataset,
        reference_model: torch.nn.Module | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        temperature: float = 1.0,
        metric_key_prefix: str = "eval",
    ) -> None:
        _check_heldout_dataset(eval_dataset, "eval_dataset")
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(max_batches, "max_batches", allow_none=True)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0 (1.0 compares the raw distributions).")
        self.eval_dataset = eval_dataset
        self.reference_model = reference_model
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.temperature = temperature
        self.metric_key_prefix = metric_key_prefix
        self._reference_perplexity: float | None = None
        # (global_step, metrics): weights change only with optimizer steps, so one computation serves every
        # evaluation log of a step (several eval datasets, or `trainer.evaluate()` right after training).
        self._cached: tuple[int, dict[str, float]] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cached = None
        # Fail before the first step, not at the first evaluation, when the two vocabularies cannot be compared.
        if self.reference_model is not None and model is not None:
            model_vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else None
            reference_vocab = getattr(getattr(self.reference_model, "config", None), "vocab_size", None)
            if model_vocab is not None and reference_vocab is not None and model_vocab != reference_vocab:
                raise ValueError(
                    f"reference_model vocab_size {reference_vocab} != model vocab_size {model_vocab}; top-1 agreement "
                    "and KL need one shared vocabulary. Pass a reference that uses the model's tokenizer."
                )

    def compute(self, model: torch.nn.Module) -> dict[str, float]:
        """The metrics (without prefix) of `model` on the held-out set; also usable outside a Trainer."""
        import torch

        totals: dict[str, float] = {}
        reference_nll, was_training = 0.0, model.training
        model.eval()
        with torch.no_grad():
            for batch in _heldout_batches(self.eval_dataset, self.batch_size, self.max_batches):
                logits = _forward_logits(model, batch)
                reference_logits = None
                if self.reference_model is not None:
                    reference_logits = _forward_logits(self.reference_model, batch)
                    if self._reference_perplexity is None:
                        reference_nll -= float(target_log_probs(reference_logits, batch["labels"]).sum())
                statistics = prediction_statistics(logits, batch["labels"], reference_logits, self.temperature)
                for key, value in statistics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        if was_training:
            model.train()
        num_tokens = max(totals["num_tokens"], 1.0)
        loss = totals["nll_sum"] / num_tokens
        metrics = {"heldout_loss": loss, "heldout_perplexity": math.exp(loss)}
        if self.reference_model is not None:
            if self._reference_perplexity is None:
                self._reference_perplexity = math.exp(reference_nll / num_tokens)
            metrics["top1_agreement"] = totals["agreement_count"] / num_tokens
            metrics["kl_to_reference"] = totals["kl_sum"] / num_tokens
            metrics["reference_perplexity"] = self._reference_perplexity
        return metrics

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or not _is_evaluation_log(logs, self.metric_key_prefix):
            return
        if self._cached is None or self._cached[0] != state.global_step:
            self._cached = (state.global_step, self.compute(model))
        metrics = self._cached[1]
        _add_to_logs(state, logs, {f"{self.metric_key_prefix}_{key}": value for key, value in metrics.items()})


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint ensembles
# ----------------------------------------------------------------------------------------------------------------


class CheckpointEnsembleCallback(TrainerCallback):
    """Keep the last K saved checkpoints and compare, on held-out text, their ensemble and weight average with the latest.

    At every save the callback snapshots the model's weights (on CPU, so K snapshots cost K copies of the weights in
    host memory), keeps the last `num_checkpoints`, and measures the held-out perplexity of:

    - `latest`: the checkpoint just saved;
    - `ensemble`: the logit ensemble of the kept checkpoints (average of their next-token probabilities);
    - `weight_average`: one model whose floating-point weights are the mean of the kept checkpoints' (a "soup").

    They are logged as `{prefix}_ckpt_latest_perplexity`, `{prefix}_ckpt_ensemble_perplexity`,
    `{prefix}_ckpt_weight_average_perplexity` and `{prefix}_ckpt_ensemble_size`, appended to
    `trainer.state.log_history`, kept in `callback.history`, and written as `checkpoint_ensemble.json` into the
    checkpoint folder.

    Args:
        eval_dataset (`datasets.Dataset`): held-out blocks with `input_ids` (see :class:`HeldOutEvaluationCallback`).
        num_checkpoints (`int`, *optional*, defaults to 3): K, how many recent checkpoints to combine (>= 2).
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        max_batches (`int`, *optional*): evaluate on at most this many batches.
        metric_key_prefix (`str`, *optional*, defaults to `"eval"`): prefix of the logged keys.
    """

    def __init__(
        self,
        eval_dataset: Dataset,
        num_checkpoints: int = 3,
        batch_size: int = 8,
        max_batches: int | None = None,
        metric_key_prefix: str = "eval",
    ) -> None:
        _check_heldout_dataset(eval_dataset, "eval_dataset")
        _check_positive_int(num_checkpoints, "num_checkpoints")
        if num_checkpoints < 2:
            raise ValueError(f"num_checkpoints={num_checkpoints} must be >= 2: an ensemble of one is the checkpoint.")
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(max_batches, "max_batches", allow_none=True)
        self.eval_dataset = eval_dataset
        self.num_checkpoints = num_checkpoints
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.metric_key_prefix = metric_key_prefix
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.history: list[dict[str, float]] = []
        self._scratch_model: torch.nn.Module | None = None

    def _held_out_target_log_probs(self, model: torch.nn.Module) -> torch.Tensor:
        import torch

        pieces = []
        with torch.no_grad():
            for batch in _heldout_batches(self.eval_dataset, self.batch_size, self.max_batches):
                pieces.append(target_log_probs(_forward_logits(model, batch), batch["labels"]))
        return torch.cat(pieces)

    def _scratch(self, model: torch.nn.Module) -> torch.nn.Module:
        # One copy of the architecture, reloaded with each snapshot, so the live model is never touched.
        if self._scratch_model is None:
            self._scratch_model = copy.deepcopy(model)
            self._scratch_model.eval()
        return self._scratch_model

    def compare(self, model: torch.nn.Module) -> dict[str, float]:
        """Perplexities of the latest snapshot, the snapshots' logit ensemble and their weight average."""
        import torch

        scratch = self._scratch(model)
        member_log_probs = []
        for _, state_dict in self.snapshots:
            scratch.load_state_dict(state_dict)
            member_log_probs.append(self._held_out_target_log_probs(scratch))
        average = {}
        for name, tensor in self.snapshots[-1][1].items():
            if tensor.is_floating_point():
                average[name] = torch.stack([snapshot[name].double() for _, snapshot in self.snapshots]).mean(0)
                average[name] = average[name].to(tensor.dtype)
            else:  # integer buffers (e.g. position ids) are taken from the latest checkpoint
                average[name] = tensor
        scratch.load_state_dict(average)
        average_log_probs = self._held_out_target_log_probs(scratch)
        prefix = f"{self.metric_key_prefix}_ckpt"
        return {
            f"{prefix}_latest_perplexity": math.exp(-float(member_log_probs[-1].mean())),
            f"{prefix}_ensemble_perplexity": math.exp(-float(ensemble_log_probs(member_log_probs).mean())),
            f"{prefix}_weight_average_perplexity": math.exp(-float(average_log_probs.mean())),
            f"{prefix}_ensemble_size": float(len(self.snapshots)),
        }

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        snapshot = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
        self.snapshots.append((state.global_step, snapshot))
        del self.snapshots[: -self.num_checkpoints]
        if len(self.snapshots) < 2:
            return
        metrics = self.compare(model)
        metrics["step"] = state.global_step
        self.history.append(metrics)
        state.log_history.append(dict(metrics))
        logger.info(f"checkpoint ensemble at step {state.global_step}: {metrics}")
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint_dir.is_dir():
            atomic_write_json(
                checkpoint_dir / "checkpoint_ensemble.json",
                {**metrics, "checkpoint_steps": [step for step, _ in self.snapshots]},
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._scratch_model = None  # free the scratch copy; snapshots stay for inspection


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------

# TrainingArguments fields worth a line in a card (plus the distillation knobs when the args have them).
_CARD_HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "seed",
    "optim",
    "loss_type",
    "temperature",
    "kd_ratio",
    "jsd_beta",
    "skew_alpha",
    "lmbda",
)


def _card_metrics(state: TrainerState, prefix: str) -> dict[str, float]:
    """The most recent value of each evaluation metric in `log_history` (speed measurements left out)."""
    metrics: dict[str, float] = {}
    for entry in state.log_history:
        for key, value in entry.items():
            if not key.startswith(f"{prefix}_") or key.endswith(_SPEED_SUFFIXES):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[key[len(prefix) + 1 :]] = float(value)
    return metrics


class ModelCardCallback(TrainerCallback):
    """Write (or update) a model card, `README.md`, and a lineage manifest into every checkpoint the Trainer saves,
    and into `output_dir` when training ends.

    The card records the run's hyperparameters (from the `TrainingArguments`, including `temperature` / `kd_ratio`
    when present), the latest evaluation metrics as `model-index`, and the lineage you pass. The lineage manifest
    (`hf_interop_lineage.json`, see :func:`hf_interop.write_lineage_manifest`) resolves hub ids to commit hashes once,
    when training begins, so an unresolvable teacher stops the run before its first step.

    Args:
        kind (`str`, *optional*, defaults to `"finetuned"`): card kind (see :func:`hf_interop.render_model_card`);
            `"distilled"` needs `teachers=...`.
        metric_key_prefix (`str`, *optional*, defaults to `"eval"`): prefix of the evaluation keys to report.
        write_lineage (`bool`, *optional*, defaults to `True`): also write the lineage manifest.
        **metadata: passed to :func:`hf_interop.write_model_card` (`base_model`, `teachers`, `members`,
            `datasets`, ...). `hyperparameters` you pass are merged over the ones read from the arguments.
    """

    def __init__(
        self, kind: str = "finetuned", metric_key_prefix: str = "eval", write_lineage: bool = True, **metadata: Any
    ) -> None:
        from .hub.cards import render_model_card

        # Render once now, so a missing field or a typo fails before training rather than at the first save.
        render_model_card(kind, **metadata)
        self.kind = kind
        self.metric_key_prefix = metric_key_prefix
        self.metadata = metadata
        self.write_lineage = write_lineage
        self.lineage: dict[str, Any] | None = None
        self.written: list[Path] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.write_lineage and state.is_world_process_zero and self.lineage is None:
            from .hub import build_lineage_manifest

            self.lineage = build_lineage_manifest(
                kind=self.kind,
                base_model=self.metadata.get("base_model"),
                teachers=self.metadata.get("teachers"),
                members=self.metadata.get("members"),
                datasets=self.metadata.get("datasets"),
            )

    def _write(self, folder: Path, args: TrainingArguments, state: TrainerState) -> None:
        from .hub.outputs import write_output_metadata

        hyperparameters = {name: getattr(args, name) for name in _CARD_HYPERPARAMETERS if hasattr(args, name)}
        hyperparameters["global_step"] = state.global_step
        hyperparameters.update(self.metadata.get("hyperparameters") or {})
        metadata = {**self.metadata, "hyperparameters": hyperparameters}
        metrics = {**_card_metrics(state, self.metric_key_prefix), **(self.metadata.get("metrics") or {})}
        metadata["metrics"] = metrics or None
        lineage = (
            None if self.lineage is None else {"manifest": self.lineage, "extra": {"global_step": state.global_step}}
        )
        written = write_output_metadata(folder, self.kind, card=metadata, lineage=lineage, link_manifest=True)
        self.written.append(written.card)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self._write(folder, args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.isdir(args.output_dir):
            self._write(Path(args.output_dir), args, state)


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------

# Checkpoint files that only resuming needs (and pickles, which safe loaders refuse): kept local, not pushed.
CHECKPOINT_IGNORE_PATTERNS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")


class HubPushCallback(TrainerCallback):
    """Check Hub access before training starts, then push every saved checkpoint to a branch of `repo_id`.

    `on_train_begin` runs :func:`hf_interop.hub.check_hub_access` (repo id, token, reachable Hub, write access), so a
    missing token or an unreachable Hub stops the run before its first step instead of after hours of training.
    Each save is then pushed as one commit to `revision` (files only needed to resume, such as `optimizer.pt`, stay
    local). A failed push is logged and recorded in `failed`; training goes on and the local checkpoint is intact.

    Args:
        repo_id (`str`): target repository, `"namespace/name"`.
        token (`str`, *optional*): Hub token; defaults to the stored one.
        revision (`str`, *optional*, defaults to `"main"`): branch the checkpoints are committed to (created if
            missing), e.g. `"training"` to keep `main` for the final model.
        private (`bool`, *optional*): visibility if the repository is created.
        push_checkpoints (`bool`, *optional*, defaults to `True`): `False` only runs the preflight check.
        ignore_patterns (`list[str]`, *optional*): files left out of each push; defaults to the hf_interop temporary
            files plus :data:`CHECKPOINT_IGNORE_PATTERNS`.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        push_checkpoints: bool = True,
        ignore_patterns: Sequence[str] | None = None,
    ) -> None:
        from .hub import DEFAULT_IGNORE_PATTERNS, check_repo_id

        self.repo_id = check_repo_id(repo_id)
        self.token = token
        self.revision = revision or "main"
        self.private = private
        self.push_checkpoints = push_checkpoints
        self.ignore_patterns = (
            tuple(ignore_patterns)
            if ignore_patterns is not None
            else (*DEFAULT_IGNORE_PATTERNS, *CHECKPOINT_IGNORE_PATTERNS)
        )
        self.pushed: list[dict[str, Any]] = []
        self.failed: list[tuple[int, str]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        from .hub import check_hub_access

        if state.is_world_process_zero:
            check_hub_access(self.repo_id, token=self.token, revision=self.revision)

    def on_save(self, args, state, control, **kwargs):
        if not (self.push_checkpoints and state.is_world_process_zero):
            return
        from .hub import push_output_to_hub

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        try:
            result = push_output_to_hub(
                folder,
                self.repo_id,
                revision=self.revision,
                token=self.token,
                private=self.private,
                commit_message=f"Checkpoint at step {state.global_step}",
                ignore_patterns=self.ignore_patterns,
            )
        except Exception as error:  # the run must not die for a push; the checkpoint is on disk
            logger.warning(f"could not push {folder} to {self.repo_id}: {error}")
            self.failed.append((state.global_step, str(error)))
            return
        self.pushed.append({"step": state.global_step, **result})


# ----------------------------------------------------------------------------------------------------------------
# Schedules of training knobs
# ----------------------------------------------------------------------------------------------------------------

_VALUE_RULES = {
    "temperature": (lambda value: value > 0, "must be > 0 (it divides the logits)"),
    "kd_ratio": (lambda value: 0.0 <= value <= 1.0, "must be in [0, 1]"),
}


class ParameterScheduleCallback(TrainerCallback):
    """Set a training knob (e.g. `temperature`, `kd_ratio`) at the start of every optimizer step.

    The value moves from `start` at step 0 to `end` at the last step (`state.max_steps`, or `total_steps`) along
    `schedule` (`"constant"`, `"linear"`, `"cosine"`, `"step"`). It is written to `target.<name>`: by default the
    `TrainingArguments` (`args.temperature`, which :class:`hf_interop.DistillationTrainer` reads every step), or any
    object you pass (e.g. the trainer, for a `compute_loss` that reads `self.temperature`). The current value is added
    to every training log under `name`.

    Args:
        name (`str`): attribute to set; the target must already have it (a typo would otherwise do nothing).
        start (`float`), end (`float`): values at the first and last step.
        schedule (`str`, *optional*, defaults to `"linear"`): shape of the curve.
        num_stages (`int`, *optional*, defaults to 4): plateaus of the `"step"` schedule.
        total_steps (`int`, *optional*): steps of the schedule; defaults to the Trainer's `max_steps`.
        target (`object`, *optional*): where to set the attribute; defaults to the Trainer's `args`.
    """

    def __init__(
        self,
        name: str,
        start: float,
        end: float,
        schedule: str = "linear",
        num_stages: int = 4,
        total_steps: int | None = None,
        target: Any = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; use one of {', '.join(SCHEDULES)}.")
        _check_positive_int(num_stages, "num_stages")
        _check_positive_int(total_steps, "total_steps", allow_none=True)
        if schedule == "step" and num_stages < 2:
            raise ValueError(f"num_stages={num_stages} must be >= 2 for a step schedule (1 stage is 'constant').")
        if name in _VALUE_RULES:
            is_valid, rule = _VALUE_RULES[name]
            for argument, value in (("start", start), ("end", end)):
                if not is_valid(value):
                    raise ValueError(f"{name} schedule {argument}={value!r} {rule}.")
        self.name = name
        self.start = float(start)
        self.end = float(end)
        self.schedule = schedule
        self.num_stages = num_stages
        self.total_steps = total_steps
        self.target = target
        self.current: float | None = None
        self.values: list[tuple[int, float]] = []

    def _target(self, args: TrainingArguments) -> Any:
        return self.target if self.target is not None else args

    def value_at(self, step: int, total_steps: int) -> float:
        return scheduled_value(step, total_steps, self.start, self.end, self.schedule, self.num_stages)

    def on_train_begin(self, args, state, control, **kwargs):
        target = self._target(args)
        if not hasattr(target, self.name):
            raise ValueError(
                f"{type(target).__name__} has no attribute {self.name!r}, so scheduling it would change nothing. Use "
                "hf_interop.DistillationConfig (it has temperature and kd_ratio), or pass target=<the object whose "
                f"{self.name!r} your loss reads>."
            )
        self._set(args, state)

    def _set(self, args, state) -> None:
        total_steps = self.total_steps or state.max_steps
        self.current = self.value_at(state.global_step, total_steps)
        setattr(self._target(args), self.name, self.current)
        if not self.values or self.values[-1][0] != state.global_step:
            self.values.append((state.global_step, self.current))

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.current is not None and "loss" in logs:
            _add_to_logs(state, logs, {self.name: self.current})


# One class per knob: transformers warns when two callbacks of the same class are added to one Trainer.
class TemperatureScheduleCallback(ParameterScheduleCallback):
    """:class:`ParameterScheduleCallback` of the distillation temperature (`args.temperature`)."""

    def __init__(self, start: float, end: float, schedule: str = "linear", **kwargs: Any) -> None:
        super().__init__("temperature", start, end, schedule=schedule, **kwargs)


class KDRatioScheduleCallback(ParameterScheduleCallback):
    """:class:`ParameterScheduleCallback` of the distillation weight `kd_ratio` (`args.kd_ratio`)."""

    def __init__(self, start: float, end: float, schedule: str = "linear", **kwargs: Any) -> None:
        super().__init__("kd_ratio", start, end, schedule=schedule, **kwargs)


def temperature_schedule(
    start: float, end: float, schedule: str = "linear", **kwargs: Any
) -> ParameterScheduleCallback:
    """Schedule of the distillation temperature (`args.temperature`); see :class:`ParameterScheduleCallback`."""
    return TemperatureScheduleCallback(start, end, schedule=schedule, **kwargs)


def kd_ratio_schedule(start: float, end: float, schedule: str = "linear", **kwargs: Any) -> ParameterScheduleCallback:
    """Schedule of the distillation weight `kd_ratio` (`args.kd_ratio`); see :class:`ParameterScheduleCallback`."""
    return KDRatioScheduleCallback(start, end, schedule=schedule, **kwargs)


__all__ = [
    "HeldOutEvaluationCallback",
    "CheckpointEnsembleCallback",
    "ModelCardCallback",
    "HubPushCallback",
    "ParameterScheduleCallback",
    "TemperatureScheduleCallback",
    "KDRatioScheduleCallback",
    "temperature_schedule",
    "kd_ratio_schedule",
    "prediction_statistics",
    "target_log_probs",
    "ensemble_log_probs",
    "scheduled_value",
    "SCHEDULES",
]
