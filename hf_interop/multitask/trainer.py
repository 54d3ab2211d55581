"""`MultiTaskTrainer`: one model trained on several tasks at once, with each task's loss weighted.

`train_dataset={task: dataset}` (and `eval_dataset` the same way). Each step draws a task (or every task, with
`task_sampling="all"`) from a schedule that is a function of the seed alone (:mod:`.sampling`), so every process
trains on the same task at the same step and a resumed run repeats the uninterrupted one. Task losses are combined
by :mod:`.weighting` (static weights, learned uncertainty log-variances, or PCGrad on the tasks' gradients). Logs
carry `<task>_loss` and `<task>_weight`; evaluation gives `eval_<task>_loss` plus `eval_<task>_perplexity`
(causal-LM tasks) or `eval_<task>_accuracy` (classification).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from ..logging_utils import get_logger
from ..utils import atomic_write_json
from .batches import MultiTaskCollator, TaskRows, check_task_datasets
from .config import MultiTaskConfig
from .heads import MultiTaskModel
from .weighting import (
    check_task_weights,
    effective_weights,
    pcgrad_combine,
    static_weighted_sum,
    uncertainty_weighted_sum,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

STATE_NAME = "multitask_state.json"
LOG_VARIANCES_NAME = "task_log_variances.safetensors"


class MultiTaskTrainer(Trainer):
    r"""
    A `transformers.Trainer` that trains one model on several tasks, each task's loss weighted.

    Args:
        model (`MultiTaskModel` or `PreTrainedModel`):
            A [`MultiTaskModel`] (shared backbone with per-task heads), or a causal LM when every task is a
            causal-LM task (e.g. language modelling on several domains).
        args ([`MultiTaskConfig`], *optional*):
            Training, task-sampling and task-weighting settings.
        data_collator (`Callable`, *optional*):
            Defaults to [`MultiTaskCollator`]: rows grouped by task, right-padded.
        train_dataset (`dict[str, datasets.Dataset]`):
            Tokenized rows per task: `input_ids` (and `labels` for causal LM, optional), plus a `labels`/`label`
            column of class ids or floats for tasks with a classification or regression head.
        eval_dataset (`dict[str, datasets.Dataset]`, *optional*):
            Held-out rows per task (a subset of the training tasks).
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer (its pad id pads batches; saved with the model).
        heads (`dict[str, dict]`, *optional*):
            With a causal LM as `model`: wrap it in a [`MultiTaskModel`] with these heads, e.g.
            `{"domain": {"type": "classification", "num_labels": 2}}`.
        peft_config (`peft.PeftConfig`, *optional*):
            Wrap the backbone with these adapters (e.g. LoRA) first; the heads stay fully trainable.
        **kwargs:
            Passed to `transformers.Trainer` (`callbacks`, `optimizers`, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MultiTaskConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: dict[str, Any] | None = None,
        eval_dataset: dict[str, Any] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        heads: dict[str, dict[str, Any]] | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = MultiTaskConfig(output_dir="multitask_output")
        if not isinstance(args, MultiTaskConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; MultiTaskTrainer needs a hf_interop.MultiTaskConfig "
                "(TrainingArguments plus task_sampling / task_weighting): MultiTaskConfig(output_dir=..., ...)."
            )
        if model is None:
            raise ValueError("model is required: a MultiTaskModel, or a causal LM (with heads=... for head tasks).")
        if train_dataset is None and eval_dataset is None:
            raise ValueError("give train_dataset={task: dataset} (and/or eval_dataset the same way).")
        self.task_names = list(train_dataset if train_dataset is not None else eval_dataset)
        model = self._build_model(model, heads, peft_config)
        self._check_inputs(model, args, train_dataset, eval_dataset)
        weights = args.task_weights or {}
        self.static_weights = [float(weights.get(task, 1.0)) for task in self.task_names]
        self.task_types = {task: self._task_type(model, task) for task in self.task_names}
        if data_collator is None:
            data_collator = MultiTaskCollator(self.task_names, self.task_types, _pad_token_id(model, processing_class))
        self.task_sizes = [len(train_dataset[task]) for task in self.task_names] if train_dataset else None
        train_rows = TaskRows(train_dataset, self.task_names) if train_dataset is not None else None
        eval_rows = None
        if eval_dataset is not None:
            eval_rows = {task: TaskRows({task: eval_dataset[task]}, self.task_names) for task in eval_dataset}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=processing_class,
            **kwargs,
        )
        # Each task's loss is a mean over its own batch (tokens or rows); the Trainer divides by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.log_variances: nn.Parameter | None = None
        if args.task_weighting == "uncertainty":
            self.log_variances = nn.Parameter(torch.zeros(len(self.task_names), device=args.device))
            # the Trainer zeroes the model's gradients after each optimizer step, not those of parameters outside it
            self.add_callback(_ClearGradients(self.log_variances))
        self.task_sampler = None
        self.steps_drawn = [0] * len(self.task_names)  # micro-batches each task has trained on, this process
        self._sums: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}

    # ---------------------------------------------------------------- construction helpers

    @staticmethod
    def _build_model(model: nn.Module, heads: dict | None, peft_config: Any) -> nn.Module:
        if isinstance(model, (str, os.PathLike)):
            from ..loading import load_causal_lm

            model, _ = load_causal_lm(str(model))
        backbone = model.backbone if isinstance(model, MultiTaskModel) else model
        if peft_config is not None:
            from peft import get_peft_model

            backbone = get_peft_model(backbone, peft_config)
            if isinstance(model, MultiTaskModel):
                model.backbone = backbone
            else:
                model = backbone
        if heads:
            if isinstance(model, MultiTaskModel):
                raise ValueError("model is already a MultiTaskModel with its heads; do not pass heads= as well.")
            model = MultiTaskModel(model, heads)
        return model

    @staticmethod
    def _task_type(model: nn.Module, task: str) -> str:
        return model.task_type(task) if isinstance(model, MultiTaskModel) else "causal_lm"

    def _check_inputs(self, model: nn.Module, args: MultiTaskConfig, train_dataset: Any, eval_dataset: Any) -> None:
        """Every check that needs no training, naming the task: weights, heads, datasets, labels, token ids."""
        check_task_weights(args.task_weights, self.task_names, "task_weights")
        if isinstance(model, MultiTaskModel):
            unknown = [task for task in model.head_specs if task not in self.task_names]
            if unknown:
                raise ValueError(
                    f"the model has heads for task(s) {unknown} that are not among the datasets' tasks "
                    f"{self.task_names}; fix the names or give those tasks data."
                )
        types = {task: self._task_type(model, task) for task in self.task_names}
        labels = {task: model.num_labels(task) if isinstance(model, MultiTaskModel) else None for task in types}
        vocab_size = _vocab_size(model)
        if train_dataset is not None:
            check_task_datasets(train_dataset, "train_dataset", types, labels, vocab_size)
        if eval_dataset is not None:
            check_task_datasets(eval_dataset, "eval_dataset", types, labels, vocab_size, known_tasks=self.task_names)
        if args.task_weighting == "pcgrad" and (args.fsdp or args.deepspeed):
            raise ValueError(
                "task_weighting='pcgrad' projects whole per-task gradients, which FSDP and DeepSpeed shard; use DDP "
                "or task_weighting='static'/'uncertainty'."
            )

    # ---------------------------------------------------------------- data

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """One batch per process per step, all processes on the same task (see :class:`TaskBatchSampler`)."""
        from .sampling import TaskBatchSampler

        if self.train_dataset is None:
            raise ValueError("MultiTaskTrainer: training requires train_dataset={task: dataset}.")
        args = self.args
        steps = args.steps_per_epoch * args.gradient_accumulation_steps if args.steps_per_epoch else None
        self.task_sampler = TaskBatchSampler(
            self.task_sizes,
            per_device_batch_size=args.per_device_train_batch_size,
            num_processes=args.world_size,
            strategy=args.task_sampling,
            temperature=args.sampling_temperature,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            steps_per_epoch=steps,
        )
        dataloader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.task_sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(dataloader)

    # ---------------------------------------------------------------- the loss

    def _task_losses(self, model: nn.Module, task_batches: dict[str, dict], mode: str) -> dict[str, torch.Tensor]:
        """Each task's loss on its part of the batch (means over its targets), with statistics kept for the logs."""
        losses = {}
        for task, batch in task_batches.items():
            if isinstance(self.accelerator.unwrap_model(model), MultiTaskModel):
                output = model(task=task, **batch)
                loss, logits = output.loss, output.logits
            else:
                output = model(**batch, use_cache=False)
                loss, logits = output.loss, None
            losses[task] = loss
            sums = self._sums[mode].setdefault(task, [])
            statistics = [loss.detach().float(), torch.ones((), device=loss.device)]
            if self.task_types[task] == "classification" and logits is not None:
                correct = (logits.detach().argmax(-1) == batch["labels"]).sum().float()
                statistics += [correct, torch.tensor(float(batch["labels"].numel()), device=loss.device)]
            sums.append(torch.stack(statistics))
            if mode == "train":
                self.steps_drawn[self.task_names.index(task)] += 1
        return losses

    def _combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective of one micro-batch: static or uncertainty weighting of the tasks present."""
        indices = [self.task_names.index(task) for task in task_losses]
        losses = list(task_losses.values())
        weights = [self.static_weights[i] for i in indices]
        if self.log_variances is not None:
            weighted = [w * loss for w, loss in zip(weights, losses, strict=True)]
            return uncertainty_weighted_sum(weighted, self.log_variances[indices])
        return static_weighted_sum(losses, weights)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if model.training else "eval"
        task_losses = self._task_losses(model, inputs["task_batches"], mode)
        loss = self._combine(task_losses)
        return (loss, task_losses) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # Overridden for two reasons. With several tasks in one step (task_sampling="all") the per-task gradients
        # are formed here (PCGrad needs them apart) and averaged over processes by hand, because DDP's own reduction
        # runs once per backward and cannot see the tasks apart. And the uncertainty log-variances live outside the
        # wrapped model, so DDP does not average their gradients: that is done here too.
        if self.args.task_sampling == "all":
            return self._all_tasks_step(model, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.log_variances is not None and self.log_variances.grad is not None and self.args.world_size > 1:
            self.log_variances.grad = self.accelerator.reduce(self.log_variances.grad, reduction="mean")
        return loss

    def _all_tasks_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        parameters = [p for p in model.parameters() if p.requires_grad]
        extra = [self.log_variances] if self.log_variances is not None else []
        with self.accelerator.no_sync(model), self.compute_loss_context_manager():
            task_losses = self._task_losses(model, inputs["task_batches"], "train")
        if self.args.task_weighting == "pcgrad":
            gradients = self._pcgrad_gradients(task_losses, parameters)
            loss = static_weighted_sum(
                list(task_losses.values()), [self.static_weights[i] for i in self._indices(task_losses)]
            )
        else:
            loss = self._combine(task_losses)
            gradients = list(torch.autograd.grad(loss, parameters + extra, allow_unused=True))
            gradients = self._mean_over_processes(gradients)
            parameters = parameters + extra
        scale = 1.0 / self.current_gradient_accumulation_steps
        for parameter, gradient in zip(parameters, gradients, strict=True):
            if gradient is None:
                continue
            gradient = gradient.to(parameter.dtype) * scale
            parameter.grad = gradient if parameter.grad is None else parameter.grad.add_(gradient)
        return loss.detach() * scale

    def _indices(self, task_losses: dict[str, torch.Tensor]) -> list[int]:
        return [self.task_names.index(task) for task in task_losses]

    def _pcgrad_gradients(self, task_losses: dict[str, torch.Tensor], parameters: list[nn.Parameter]) -> list:
        """PCGrad over the parameters every task reaches (the shared backbone); task-only parameters (heads) keep
        their own task's gradient. Per-task gradients are averaged over processes before they are compared."""
        per_task = []
        weights = [self.static_weights[i] for i in self._indices(task_losses)]
        for weight, loss in zip(weights, task_losses.values(), strict=True):
            per_task.append(torch.autograd.grad(weight * loss, parameters, retain_graph=True, allow_unused=True))
        shared = [k for k in range(len(parameters)) if all(g[k] is not None for g in per_task)]
        own = [k for k in range(len(parameters)) if k not in shared and any(g[k] is not None for g in per_task)]
        flat = torch.stack([torch.cat([g[k].reshape(-1).float() for k in shared]) for g in per_task])
        own_sums = [sum(g[k] for g in per_task if g[k] is not None) for k in own]
        flat, *own_sums = self._mean_over_processes([flat, *own_sums])
        combined = pcgrad_combine(list(flat.double())).float()
        gradients: list = [None] * len(parameters)
        offset = 0
        for k in shared:
            size = parameters[k].numel()
            gradients[k] = combined[offset : offset + size].view_as(parameters[k])
            offset += size
        for k, gradient in zip(own, own_sums, strict=True):
            gradients[k] = gradient
        return gradients

    def _mean_over_processes(self, gradients: list) -> list:
        if self.args.world_size <= 1:
            return gradients
        present = [g for g in gradients if g is not None]
        flat = torch.cat([g.reshape(-1).float() for g in present])
        flat = self.accelerator.reduce(flat, reduction="mean")
        out, offset = [], 0
        for g in gradients:
            if g is None:
                out.append(None)
                continue
            out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
        return out

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        # Overridden because the batch is nested by task (the Trainer would find no `labels` and return no loss): the
        # evaluation loss of a task is its own unweighted loss, so `eval_<task>_perplexity` is exp of it.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            task_losses = self._task_losses(model, inputs["task_batches"], "eval")
        return torch.stack(list(task_losses.values())).sum().detach(), None, None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the uncertainty log-variances as their own group (no weight decay)."""
        optimizer = super().create_optimizer(model)
        if self.log_variances is not None:
            present = any(p is self.log_variances for group in optimizer.param_groups for p in group["params"])
            if not present:
                learning_rate = self.args.log_variance_learning_rate or self.args.learning_rate
                optimizer.add_param_group({"params": [self.log_variances], "weight_decay": 0.0, "lr": learning_rate})
        return optimizer

    # ---------------------------------------------------------------- evaluation and logs

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Per-task evaluation (`eval_<task>_loss`, `_perplexity`, `_accuracy`) plus `eval_loss`, the static-weighted
        sum of the task losses (what `metric_for_best_model="loss"` compares)."""
        if isinstance(eval_dataset, dict):
            unknown = [task for task in eval_dataset if task not in self.task_names]
            if unknown:
                raise ValueError(f"eval_dataset has unknown task(s) {unknown}; the tasks are {self.task_names}.")
            eval_dataset = {
                task: rows if isinstance(rows, TaskRows) else TaskRows({task: rows}, self.task_names)
                for task, rows in eval_dataset.items()
            }
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        tasks = eval_dataset if isinstance(eval_dataset, dict) else self.eval_dataset
        if eval_dataset is None or isinstance(eval_dataset, dict):
            present = [
                t for t in self.task_names if isinstance(tasks, dict) and f"{metric_key_prefix}_{t}_loss" in metrics
            ]
            if present:
                losses = [torch.tensor(metrics[f"{metric_key_prefix}_{t}_loss"], dtype=torch.float64) for t in present]
                weights = [self.static_weights[self.task_names.index(t)] for t in present]
                metrics[f"{metric_key_prefix}_loss"] = float(static_weighted_sum(losses, weights))
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._add_task_logs(logs, "train", "")
            for i, task in enumerate(self.task_names):
                weights = effective_weights(self.args.task_weighting, self.static_weights, self.log_variances)
                logs[f"{task}_weight"] = weights[i]
                if self.log_variances is not None:
                    logs[f"{task}_log_variance"] = float(self.log_variances[i].detach())
                logs[f"{task}_steps"] = self.steps_drawn[i]
        elif self._sums["eval"]:
            prefix = next((key[: -len("loss")] for key in logs if key.endswith("_loss")), None)
            if prefix is not None:
                self._add_task_logs(logs, "eval", prefix)
            self._sums["eval"] = {}
        super().log(logs, start_time)

    def _add_task_logs(self, logs: dict[str, float], mode: str, prefix: str) -> None:
        """Means since the last log, over all processes: `<task>_loss` (train), and for one evaluated task its
        perplexity or accuracy under `prefix` (e.g. `eval_python_docs_`)."""
        rows = torch.zeros(len(self.task_names), 4, dtype=torch.float64, device=self.args.device)
        for task, statistics in self._sums[mode].items():
            stacked = torch.stack([s.double().to(rows.device) for s in statistics])
            padded = torch.zeros(4, dtype=torch.float64, device=rows.device)
            padded[: stacked.shape[1]] = stacked.sum(0)
            rows[self.task_names.index(task)] = padded
        evaluated = list(self._sums[mode])
        self._sums[mode] = {}
        if self.args.world_size > 1:
            rows = self.accelerator.reduce(rows, reduction="sum")
        for i, task in enumerate(self.task_names):
            loss_sum, count, correct, total = rows[i].tolist()
            if mode == "train":
                if count > 0:
                    logs[f"{task}_loss"] = loss_sum / count
                continue
            if task not in evaluated or count == 0:
                continue
            if self.task_types[task] == "causal_lm":
                logs[f"{prefix}perplexity"] = math.exp(min(logs[f"{prefix}loss"], 50.0))
            elif self.task_types[task] == "classification" and total > 0:
                logs[f"{prefix}accuracy"] = correct / total

    # ---------------------------------------------------------------- saving and resuming

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Private hook, overridden so that a MultiTaskModel is saved with its own save_pretrained (backbone, heads,
        # config) and every save also stores the learned log-variances and the sampler's state, which resuming reads.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if isinstance(unwrapped, MultiTaskModel):
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            unwrapped.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        else:
            super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self._save_task_state(output_dir)

    def _save_task_state(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        if self.log_variances is not None:
            temporary = os.path.join(output_dir, f".{LOG_VARIANCES_NAME}.tmp")
            save_file({"log_variances": self.log_variances.detach().cpu().contiguous()}, temporary)
            os.replace(temporary, os.path.join(output_dir, LOG_VARIANCES_NAME))
        state = {
            "tasks": self.task_names,
            "task_types": self.task_types,
            "task_sizes": self.task_sizes,
            "task_sampling": self.args.task_sampling,
            "sampling_temperature": self.args.sampling_temperature,
            "task_weighting": self.args.task_weighting,
            "static_weights": self.static_weights,
            "effective_weights": effective_weights(self.args.task_weighting, self.static_weights, self.log_variances),
            "seed": self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            "steps_drawn": self.steps_drawn,
        }
        atomic_write_json(os.path.join(output_dir, STATE_NAME), state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Private hook, overridden so that resuming loads a MultiTaskModel's own files and restores the learned
        # log-variances and the sampler's state (and refuses a checkpoint of other tasks, whose schedule differs).
        self._check_resumed_state(resume_from_checkpoint)
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(unwrapped, MultiTaskModel):
            unwrapped.load_task_state(resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, LOG_VARIANCES_NAME)
        if self.log_variances is not None:
            if not os.path.isfile(path):
                raise ValueError(
                    f"checkpoint {resume_from_checkpoint!r} holds no {LOG_VARIANCES_NAME}: it was not written with "
                    "task_weighting='uncertainty'; resume with the settings it was trained with."
                )
            from safetensors.torch import load_file

            with torch.no_grad():
                self.log_variances.copy_(load_file(path)["log_variances"].to(self.log_variances.device))

    def _check_resumed_state(self, checkpoint: str) -> None:
        import json

        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        for key, value in (
            ("tasks", self.task_names),
            ("task_sizes", self.task_sizes),
            ("task_sampling", self.args.task_sampling),
        ):
            if state.get(key) != value:
                raise ValueError(
                    f"checkpoint {checkpoint!r} was trained with {key}={state.get(key)!r}, this run has {value!r}; "
                    "resume with the same tasks and datasets (the task schedule depends on them), or start afresh."
                )
        self.steps_drawn = list(state.get("steps_drawn", self.steps_drawn))


class _ClearGradients(TrainerCallback):
    def __init__(self, parameter: nn.Parameter) -> None:
        self.parameter = parameter

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.parameter.grad = None


def _pad_token_id(model: nn.Module, processing_class: Any) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    for source in (tokenizer, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                return value
    return 0


def _vocab_size(model: nn.Module) -> int | None:
    backbone = model.backbone if isinstance(model, MultiTaskModel) else model
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    return int(embeddings.weight.shape[0]) if embeddings is not None else None
