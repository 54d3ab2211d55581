"""`DistillationTrainer`: knowledge distillation from a teacher causal LM into a student, as a `transformers.Trainer`.

The student learns `kd_ratio * KD + (1 - kd_ratio) * CE (+ hidden_loss_weight * hidden)` where KD is a token-level
divergence (see :mod:`hf_interop.losses`) between the teacher's and the student's next-token distributions. By default
the loss is computed in chunks of valid tokens from each model's final hidden states and output head, so neither
model's full (batch, sequence, vocabulary) logits tensor is ever built. Every term is normalised by the number of valid
target tokens of the whole accumulated, global batch, which the Trainer passes to `compute_loss` as
`num_items_in_batch`: the result does not depend on how a batch is split into gradient-accumulation steps or processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import losses
from ..logging_utils import get_logger
from ..multitask.weighting import static_weighted_sum
from .checkpoints import _no_half_checkpoint, _resume_target, _write_distilled_card
from .collators import (
    IGNORE_INDEX,
    TEACHER_CACHE_COLUMNS,
    _cache_dataset_columns,
    _PaddingCollator,
    _TeacherCacheCollator,
)
from .cpu_fsdp import _requested_cpu_fsdp_plugin, _switch_state_to_fsdp
from .distillation_config import DistillationConfig
from .generation import _build_generation_config, _draws_on_policy, _generate_batch_for
from .hidden_states import (
    _check_hidden_layer_map,
    _hidden_state_loss,
    _load_projections,
    _ProjectionGradients,
    _projections,
    _save_projections,
)
from .model_utils import (
    _accepts_argument,
    _first_device,
    _has_output_head,
    _is_peft_model,
    _model_name,
    _pad_token_id,
    _text_config,
    _tokenizer_of,
    _vocab_size,
    _without_tied_copies,
)
from .preflight import _check_datasets, _check_output_dir, _warn_if_emulated_bf16
from .served_teacher import online as served
from .served_teacher.client import is_served_teacher
from .teacher import (
    _check_teacher_against_student,
    _load_teacher,
    _place_teacher,
    _self_distillation_output_head,
    _teacher_output_head,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

LOGGED_METRICS = ("kd_loss", "ce_loss", "hidden_loss", "top1_agreement", "teacher_entropy", "student_entropy")


class DistillationTrainer(Trainer):
    r"""
    A `transformers.Trainer` that distils a teacher causal LM into the student `model`.

    The teacher is frozen, kept in eval mode, run under `torch.no_grad()` and never wrapped for distributed
    training. It is placed through Accelerate: on the student's device by default, on its own device(s) with
    `args.teacher_device_map` (e.g. `{"": "cuda:1"}`, or `"auto"` with `args.teacher_max_memory`), sharded like the
    student under DeepSpeed ZeRO-3, and whole on every process under FSDP (prepared in evaluation mode, never
    sharded). Those two use the dense loss, because the student's output head is sharded outside the forward pass.
    FSDP2 also runs on several CPU processes (gloo, `use_cpu=True` under `torchrun`).

    Args:
        model (`PreTrainedModel`, `PeftModel` or `str`):
            The student causal LM, or a name/path loaded with [`load_causal_lm`].
        teacher_model (`PreTrainedModel`, `nn.Module` or `str`, *optional*):
            The teacher, or a name/path loaded with [`load_causal_lm`] using `args.teacher_revision`,
            `args.teacher_dtype` and `args.teacher_device_map`. Defaults to `args.teacher_model_name_or_path`. When
            neither is given and the student is a `PeftModel`, the teacher is the student's own base model with its
            adapters disabled (self-distillation; no second copy of the weights). A teacher without output embeddings
            (e.g. [`EnsembleForCausalLM`]) is run for its full logits.
        args ([`DistillationConfig`], *optional*):
            Training and distillation settings.
        data_collator (`Callable`, *optional*):
            Defaults to right-padding `input_ids` / `attention_mask` / `labels` (-100 on padding; labels default to
            the inputs). Labels are not shifted: position `i` of the logits predicts `labels[i + 1]`.
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Tokenized rows (`input_ids`, optionally `attention_mask` and `labels`), e.g. from [`pack_dataset`].
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The student's tokenizer (checked against the teacher's).
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
            The teacher's tokenizer, when the teacher is a model object whose tokenizer cannot be found next to its
            weights. Needed only when the two models' vocabulary sizes differ.
        peft_config (`peft.PeftConfig`, *optional*):
            Wrap the student with these adapters (e.g. LoRA) before training.
        **kwargs:
            Passed to `transformers.Trainer` (`callbacks`, `optimizers`, `compute_metrics`, ...).
    """

    # compute_loss normalises by `num_items_in_batch` itself, so the Trainer must not divide by the accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        args = self._checked_config(args)
        # cheap checks first, before a student or teacher is loaded
        _check_datasets(train_dataset, eval_dataset, needs_input_ids=data_collator is None)
        if train_dataset is not None:
            _check_output_dir(args, None, at_train=False)
        args, model, processing_class = self._config_and_student(args, model, processing_class, peft_config)
        _check_hidden_layer_map(model, args)

        # ---- the teacher: a cache, a live model, or the student's own base (self-distillation) ----
        self.teacher_model: nn.Module | None = None
        self.teacher_cache = None
        self.self_distillation = False
        self.teacher_name_or_path: str | None = None
        self.shared_vocab_size: int | None = None
        self.teacher_tail_prior = None  # sparse_tail="teacher_marginal": the cache's mean teacher distribution
        self.served_teacher = self.generation_server = None  # a teacher (and a student copy) behind a server
        if args.teacher_logits_path is not None:
            train_dataset = self._use_teacher_cache(model, teacher_model, args, processing_class, train_dataset)
        elif args.teacher_url is not None or is_served_teacher(teacher_model):
            self.served_teacher, self.shared_vocab_size = served.connect_served_teacher(
                args, teacher_model, processing_class, _vocab_size(model)
            )
            self.teacher_name_or_path = self.served_teacher.model
        else:
            self._use_live_teacher(model, teacher_model, args, processing_class, teacher_processing_class)

        if data_collator is None:
            data_collator = _PaddingCollator(_pad_token_id(model, processing_class))
        if self.teacher_cache is not None:
            data_collator = _TeacherCacheCollator(data_collator, self.teacher_cache)
        if self.served_teacher is not None:
            data_collator = served.ServedTeacherCollator(data_collator, self.served_teacher)
        if args.student_generation_url is not None and args.lmbda > 0:
            self.generation_server = served.connect_generation_server(
                args.student_generation_url, args, processing_class
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The Trainer counts `num_items_in_batch` (valid targets of the whole accumulated batch, gathered across
        # processes) only for models that take loss kwargs, and counts over `labels[..., 1:]` only when it knows the
        # loss shifts labels. This trainer always computes a shifted causal-LM loss normalised by that count.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

        self._deepspeed_zero3 = self.is_deepspeed_enabled and self._deepspeed_stage() == 3
        # Sharded parameters (ZeRO-3, FSDP) are only whole inside the wrapped forward, so the chunked loss, which
        # applies the output heads outside it, is replaced by the dense loss there.
        self.use_chunked_loss = (
            args.loss_chunk_size > 0
            and not self._deepspeed_zero3
            and not self.is_fsdp_enabled
            and _accepts_argument(model, "logits_to_keep")
        )
        if args.loss_chunk_size > 0 and not self.use_chunked_loss:
            logger.info("Using the dense distillation loss (sharded training or a model without logits_to_keep).")
        if self.teacher_model is not None:
            self.teacher_model = _place_teacher(self, self.teacher_model, args)
        self.hidden_projections = self._build_projections(model, args)
        self._metric_sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._generated_step = False
        self._on_policy_decision: tuple[int, bool] | None = None
        self._generation_config = (
            _build_generation_config(model, processing_class, args) if (args.lmbda > 0 or args.seq_kd) else None
        )
        self._saved_model_here = False  # this trainer's own final save does not count as a model to protect
        _warn_if_emulated_bf16(self.args)

    # ---------------------------------------------------------------- construction helpers

    @staticmethod
    def _checked_config(args: DistillationConfig | None) -> DistillationConfig:
        if args is None:
            args = DistillationConfig(output_dir="distillation_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; DistillationTrainer needs a hf_interop.DistillationConfig (a "
                "TrainingArguments subclass with the distillation settings): DistillationConfig(output_dir=..., ...)."
            )
        return args

    def _config_and_student(
        self, args: DistillationConfig, model: Any, processing_class: Any, peft_config: Any
    ) -> tuple[DistillationConfig, nn.Module, Any]:
        """The checked config, and the student (loaded by name, wrapped with `peft_config`) with its tokenizer."""
        if model is None:
            raise ValueError("model (the student) is required: pass a causal LM or its name/path.")
        if isinstance(model, (str, os.PathLike)):
            from ..loading import load_causal_lm

            model, loaded_tokenizer = load_causal_lm(model, allow_pickle=args.allow_pickle)
            processing_class = processing_class if processing_class is not None else loaded_tokenizer
        if peft_config is not None:
            model = self._wrap_with_peft(model, peft_config, args)
        return args, model, processing_class

    def _use_teacher_cache(
        self,
        model: nn.Module,
        teacher_model: nn.Module | str | None,
        args: DistillationConfig,
        processing_class: Any,
        train_dataset: Any,
    ) -> Any:
        """Load the teacher cache of `args.teacher_logits_path`, check it, and return `train_dataset` with its columns."""
        if teacher_model is not None or args.teacher_model_name_or_path is not None:
            raise ValueError(
                f"teacher_logits_path={args.teacher_logits_path!r} replaces the teacher, but a teacher was also "
                "given (teacher_model / teacher_model_name_or_path); pass one or the other."
            )
        if args.loss_type not in losses.SPARSE_LOSS_TYPES:
            raise ValueError(
                f"loss_type={args.loss_type!r} cannot be computed from a top-k teacher cache; use one of "
                f"{list(losses.SPARSE_LOSS_TYPES)} with teacher_logits_path, or a live teacher."
            )
        from .teacher_cache import TeacherLogitsCache

        # every shard's sha256 is checked before training reads it (a changed byte would train on altered targets)
        self.teacher_cache = TeacherLogitsCache.load(args.teacher_logits_path, verify_checksums=True)
        self.teacher_cache.check_compatible(tokenizer=processing_class, dataset=train_dataset)
        self.teacher_cache.check_loss(args.loss_type, args.temperature)
        if train_dataset is not None:
            train_dataset = self.teacher_cache.attach(train_dataset)
        manifest = self.teacher_cache.manifest
        self.teacher_name_or_path = manifest.get("teacher") or manifest.get("teacher_name_or_path")
        cache_vocab = manifest.get("vocab_size")
        if cache_vocab is not None and int(cache_vocab) != _vocab_size(model) and processing_class is not None:
            # same tokenizer (check_compatible compared fingerprints), padded embeddings on one side
            self.shared_vocab_size = len(_tokenizer_of(processing_class))
        if args.sparse_tail == "teacher_marginal":
            prior = self.teacher_cache.tail_prior_logprobs()
            self.teacher_tail_prior = prior[: self.shared_vocab_size] if self.shared_vocab_size else prior
        return train_dataset

    def _use_live_teacher(
        self,
        model: nn.Module,
        teacher_model: nn.Module | str | None,
        args: DistillationConfig,
        processing_class: Any,
        teacher_processing_class: Any,
    ) -> None:
        """The teacher as given, loaded by name, or (no teacher, a PeftModel student) the student's own base."""
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, (str, os.PathLike)):
            self.teacher_name_or_path = str(teacher_model)
            teacher_model, loaded_teacher_tokenizer = _load_teacher(str(teacher_model), args)
            if teacher_processing_class is None:
                teacher_processing_class = loaded_teacher_tokenizer
        if teacher_model is None:
            if not _is_peft_model(model):
                raise ValueError(
                    "no teacher: pass teacher_model=... (a model or a name/path), set "
                    "DistillationConfig.teacher_model_name_or_path or teacher_logits_path, or give a PeftModel "
                    "student (or peft_config=...) to self-distil from its base model with adapters disabled."
                )
            self.self_distillation = True
            self.teacher_name_or_path = _model_name(model)
        else:
            self.teacher_name_or_path = self.teacher_name_or_path or _model_name(teacher_model)
            self._check_teacher(model, teacher_model, processing_class, teacher_processing_class, args)
            self.teacher_model = teacher_model

    @staticmethod
    def _wrap_with_peft(model: nn.Module, peft_config: Any, args: DistillationConfig) -> nn.Module:
        from peft import get_peft_model

        if _is_peft_model(model):
            raise ValueError(
                "peft_config was given but the model is already a PeftModel; pass the base model with peft_config, "
                "or the PeftModel without it."
            )
        if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            # frozen embeddings: checkpointed blocks need an input that requires grad to backpropagate into adapters
            model.enable_input_require_grads()
        return get_peft_model(model, peft_config)

    def _check_teacher(
        self,
        student: nn.Module,
        teacher: nn.Module,
        processing_class: Any,
        teacher_processing_class: Any,
        args: DistillationConfig,
    ) -> None:
        """Errors that can be seen before training (see `_check_teacher_against_student`); the cross-tokenizer
        trainer overrides this hook, since it accepts tokenizers that differ."""
        shared = _check_teacher_against_student(student, teacher, processing_class, teacher_processing_class, args)
        if shared is not None:
            self.shared_vocab_size = shared

    def _build_projections(self, student: nn.Module, args: DistillationConfig) -> nn.ModuleList:
        """The hidden-state projections (none without the hidden loss); learned ones get their gradient callback."""
        if args.hidden_loss_weight <= 0 or not args.hidden_layer_map:
            return nn.ModuleList()
        teacher = self.teacher_model if self.teacher_model is not None else self.model
        teacher_config = _text_config(self.accelerator.unwrap_model(teacher) if teacher is not None else teacher)
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        projections = _projections(args, _text_config(student), teacher_config, sharded)
        if any(True for _ in projections.parameters()):
            self.add_callback(_ProjectionGradients(projections))
        return projections

    def _deepspeed_stage(self) -> int:
        plugin = self.accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0

    # ---------------------------------------------------------------- Trainer hooks

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's Accelerator, with FSDP really enabled when it was asked for on CPU processes.

        Accelerate would silently train with DDP there (see `hf_interop.distill.cpu_fsdp`): the state is switched to
        FSDP the way Accelerate does it on GPUs, and the Accelerator is built again on top of it.
        """
        super().create_accelerator_and_postprocess()
        plugin = self._cpu_fsdp_plugin()
        if plugin is None:
            return
        state = self.accelerator.state
        _switch_state_to_fsdp(state, plugin)
        super().create_accelerator_and_postprocess()
        logger.info(f"FSDP{plugin.fsdp_version} on {state.num_processes} CPU processes (gloo).")

    def _cpu_fsdp_plugin(self) -> Any:
        """The FSDP plugin asked for when Accelerate left several CPU processes on DDP (`MULTI_CPU`), else `None`."""
        return _requested_cpu_fsdp_plugin(self.accelerator.state.distributed_type, self.args.fsdp_plugin_args)

    def _set_signature_columns_if_needed(self) -> None:
        # Private hook, overridden so that the Trainer's column pruning keeps the cached teacher columns, which are
        # not arguments of the model's forward but are needed by the loss.
        super()._set_signature_columns_if_needed()
        if self.teacher_cache is not None:
            columns = _cache_dataset_columns(self.teacher_cache)
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *columns]))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the learned hidden-state projections as their own parameter group."""
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        parameters = [parameter for parameter in self.hidden_projections.parameters() if parameter.requires_grad]
        if not parameters:
            return optimizer
        if not created_here:
            logger.warning(
                "A custom optimizer was passed; add trainer.hidden_projections.parameters() to it yourself, or the "
                "hidden-state projections stay at their initial values."
            )
            return optimizer
        known = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        if not any(id(parameter) in known for parameter in parameters):
            optimizer.add_param_group({"params": parameters, "weight_decay": self.args.weight_decay})
        return optimizer

    def _tail_prior_on(self, device: torch.device) -> torch.Tensor | None:
        """The cache's tail prior (`sparse_tail="teacher_marginal"`) on `device`, moved there once, not every step."""
        if self.teacher_tail_prior is not None and self.teacher_tail_prior.device != device:
            self.teacher_tail_prior = self.teacher_tail_prior.to(device)
        return self.teacher_tail_prior

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """The Trainer's context plus the run's mixed-precision autocast (`bf16`/`fp16`) around the whole loss.

        Accelerate autocasts only the prepared student's own forward. The teacher's forward and the output heads that
        the chunked loss applies chunk by chunk run outside it and would stay in float32: with `bf16=True` that made
        a float32 teacher about 2.5x slower than under TRL (whose `GKDTrainer` prepares its teacher with Accelerate).
        The divergence math itself stays in float32 (the losses upcast logits and keep their sums out of autocast).
        """
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """On on-policy (`lmbda`) and sequence-level (`seq_kd`) steps, replace the batch with generated text first."""
        self._generated_step = False
        if self.args.lmbda > 0 or self.args.seq_kd:
            generator = "student" if self._is_on_policy_step() else ("teacher" if self.args.seq_kd else None)
            if generator is not None:
                inputs = self._prepare_inputs(inputs)
                inputs.pop(served.ANSWERS_KEY, None)
                inputs = self._generate_batch(model, inputs, generator)
                if self.served_teacher is not None:  # the server scores the new text (no prefetch possible here)
                    inputs[served.ANSWERS_KEY] = served.ask(
                        self.served_teacher, inputs, f"step {self.state.global_step}"
                    )
                # The Trainer counted valid targets on the original labels; generated rows are normalised locally.
                num_items_in_batch = None
                self._generated_step = True
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The distillation loss of one micro-batch, normalised by `num_items_in_batch`.

        Position `i` of the student predicts `labels[:, i + 1]`; targets equal to -100 or under a zero attention mask
        are excluded. With `num_items_in_batch` (the Trainer's count of valid targets over all accumulation steps
        and processes) the sum over micro-batches and processes is the exact per-token mean of the whole batch.
        """
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        cached = {name: inputs.pop(name) for name in TEACHER_CACHE_COLUMNS if name in inputs}
        if self.served_teacher is not None:  # answers asked for when the batch was built (or in a loader worker)
            when = f"at training step {self.state.global_step} ({mode})"
            cached, no_answer = served.take_answers(self.served_teacher, inputs, cached, when)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        shift_labels = labels[:, 1:]
        if attention_mask is not None:
            shift_labels = shift_labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        if self.served_teacher is not None and no_answer is not None:  # positions the server did not answer
            shift_labels = shift_labels.masked_fill(no_answer, IGNORE_INDEX)
        num_valid_tokens = int((shift_labels != IGNORE_INDEX).sum())

        local_normalizer = False
        if num_items_in_batch is None:
            # generated steps and plain evaluation: per-token mean of this micro-batch (spread over the accumulation
            # steps in training, so the optimizer step sees the mean of the micro-batch means)
            steps = self.current_gradient_accumulation_steps if model.training else 1
            num_items_in_batch = max(num_valid_tokens, 1) * steps
            local_normalizer = True

        chunked = self.use_chunked_loss and not return_outputs
        try:
            loss, outputs, statistics = self._distillation_loss(
                model, inputs, shift_labels, num_items_in_batch, cached, chunked
            )
        except ValueError as error:
            raise ValueError(f"at training step {self.state.global_step} ({mode}): {error}") from error

        normalizer = float(num_items_in_batch)
        sums = self._metric_sums[mode]
        sums["num_tokens"] = sums.get("num_tokens", 0.0) + num_valid_tokens
        for name in ("kd_loss", "ce_loss", "hidden_loss"):
            value = statistics.get(name)
            if value is not None:
                sums[name] = sums.get(name, 0.0) + float(value) * normalizer
        for name in ("top1_agreement", "teacher_entropy", "student_entropy"):
            value = statistics.get(name)
            if value is not None:
                sums[name] = sums.get(name, 0.0) + float(value) * num_valid_tokens

        if not local_normalizer and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # num_items_in_batch counts every process's tokens and DDP averages gradients over processes: undo the
            # average so each process contributes its token sum / global count.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation loss with the memory-efficient loss when only the loss is wanted (full logits otherwise)."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the distillation metrics, token-weighted over the steps since the last log and over processes."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        sums = self._metric_sums[mode]
        names = ["num_tokens", *LOGGED_METRICS]
        present = [1.0 if name in sums else 0.0 for name in names]
        values = torch.tensor(
            [sums.get(name, 0.0) for name in names] + present, dtype=torch.float64, device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        totals, seen = values[: len(names)].tolist(), values[len(names) :].tolist()
        num_tokens = totals[0]
        if seen[0] > 0:
            for name, total, was_seen in zip(names[1:], totals[1:], seen[1:], strict=True):
                if was_seen > 0:
                    logs[f"{prefix}{name}"] = total / num_tokens if num_tokens > 0 else 0.0
        self._metric_sums[mode] = {}
        if self.served_teacher is not None and mode == "train":  # seconds the loss waited for the server's answers
            logs["teacher_wait_seconds"] = self.served_teacher.statistics.pop("wait_seconds", 0.0)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Private hook, overridden so that every save (checkpoints and the final model) also stores the learned
        # hidden-state projections next to the student, which resuming needs and the student's own files exclude.
        # Under FSDP it also drops the extra copies of tied weights from the gathered state dict.
        if state_dict is not None and self.is_fsdp_enabled:
            state_dict = _without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict=state_dict)
        if not any(True for _ in self.hidden_projections.parameters()):
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        _save_projections(self.hidden_projections, output_dir, self.args.hidden_layer_map)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """`transformers.Trainer.train`, but `resume_from_checkpoint=True` skips (with a warning) checkpoints a kill or
        a full disk cut short, and an `output_dir` holding a saved model is refused unless one of its own checkpoints
        is resumed or `args.overwrite_output_dir=True`."""
        resume_from_checkpoint = _resume_target(self.args.output_dir, resume_from_checkpoint)
        if not self._saved_model_here:
            _check_output_dir(self.args, resume_from_checkpoint, at_train=True)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Private hook, overridden so that a save that fails (a full disk: ENOSPC, torch's "unexpected pos") leaves no
        # half checkpoint-N, which `resume_from_checkpoint=True` would otherwise pick, and names the folder and why.
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with _no_half_checkpoint(checkpoint_dir, run_dir, is_main_process=self.args.should_save):
            super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Private hook, overridden so that resuming restores the learned hidden-state projections saved by `_save`.
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if not any(True for _ in self.hidden_projections.parameters()):
            return
        _load_projections(self.hidden_projections, resume_from_checkpoint, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (and projections); the final save (not checkpoints) also writes a model card.

        Under FSDP with `SHARDED_STATE_DICT` the Trainer's final save writes no weights at all; here the final save
        gathers the whole student (a collective: every process calls it) so that `from_pretrained` loads it.
        """
        if (
            not _internal_call
            and self.is_fsdp_enabled
            and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        ):
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and os.path.abspath(output_dir or self.args.output_dir) == os.path.abspath(
            self.args.output_dir
        ):
            self._saved_model_here = True
        if not _internal_call and self.args.should_save:
            self._write_model_card(output_dir if output_dir is not None else self.args.output_dir)

    def _write_model_card(self, output_dir: str) -> None:
        _write_distilled_card(self, output_dir)

    # ---------------------------------------------------------------- the loss

    def _student_head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return losses.output_logits_fn(self.accelerator.unwrap_model(model))

    def _teacher_head(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The teacher's output head for the chunked loss, or `None` when the teacher's full logits must be used."""
        if self.self_distillation:
            return _self_distillation_output_head(self.accelerator.unwrap_model(self.model))
        return _teacher_output_head(self.accelerator.unwrap_model(self.teacher_model), device)

    @torch.no_grad()
    def _teacher_forward(
        self, model: nn.Module, model_inputs: dict[str, Any], want_hidden: bool, want_logits: bool
    ) -> Any:
        """Teacher outputs (hidden states and/or full logits) under no_grad, in eval mode."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if self.self_distillation:
            teacher = self.accelerator.unwrap_model(model)
        else:
            teacher = self.teacher_model
            teacher.eval()
        unwrapped = self.accelerator.unwrap_model(teacher)
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if not want_logits and _accepts_argument(unwrapped, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        if not _has_output_head(unwrapped):  # ensembles: only the inputs
            kwargs = {}
        device = _first_device(unwrapped)
        inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in model_inputs.items()}
        if self.self_distillation:
            # the student's own weights with adapters switched off; eval mode so dropout does not perturb the teacher
            was_training = teacher.training
            teacher.eval()
            try:
                with teacher.disable_adapter():
                    return teacher(**inputs, **kwargs)
            finally:
                teacher.train(was_training)
        return teacher(**inputs, **kwargs)

    def _distillation_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        shift_labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int,
        cached: dict[str, torch.Tensor],
        chunked: bool,
    ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """The loss of one micro-batch, the student's outputs and the statistics to log."""
        args = self.args
        want_layers = args.hidden_loss_weight > 0
        loss_kwargs = {**args.loss_kwargs(), "num_items_in_batch": num_items_in_batch}
        outputs = self._run_student(model, model_inputs, chunked, want_layers)

        if self.teacher_cache is not None or self.served_teacher is not None:
            loss, statistics = self._cached_teacher_loss(model, outputs, shift_labels, cached, chunked, loss_kwargs)
            return loss, outputs, statistics

        loss_kwargs["shared_vocab_size"] = self.shared_vocab_size
        teacher_outputs, result = self._live_teacher_loss(
            model, model_inputs, outputs, shift_labels, chunked, want_layers, loss_kwargs
        )
        loss = result.loss
        statistics = _statistics(result)
        if want_layers:
            hidden_loss = _hidden_state_loss(
                self.hidden_projections,
                args,
                outputs.hidden_states,
                teacher_outputs.hidden_states,
                shift_labels,
                num_items_in_batch,
            )
            loss = static_weighted_sum([loss, hidden_loss], [1.0, args.hidden_loss_weight])
            statistics["hidden_loss"] = hidden_loss.detach()
        return loss, outputs, statistics

    def _run_student(self, model: nn.Module, inputs: dict[str, Any], chunked: bool, want_layers: bool = False) -> Any:
        """The student's forward: with a chunked loss only the last position's logits (the loss applies the head to
        valid tokens chunk by chunk); hidden states where a loss reads them."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if chunked:
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        elif want_layers:
            kwargs["output_hidden_states"] = True
        return model(**inputs, **kwargs)

    def _cached_teacher_loss(
        self,
        model: nn.Module,
        outputs: Any,
        shift_labels: torch.Tensor,
        cached: dict[str, torch.Tensor],
        chunked: bool,
        loss_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss against the teacher cache's top-k distributions (the student's CE on rows without them)."""
        args = self.args
        if not cached:
            # evaluation rows carry no cached teacher: report the student's own cross-entropy
            logger.warning_once("Evaluation rows have no cached teacher logits; eval loss is the student's CE.")
            logits = outputs.logits if not chunked else self._student_head(model)(outputs.hidden_states[-1])
            result = losses.distillation_loss(
                logits[:, :-1], logits[:, :-1].detach(), shift_labels, **{**loss_kwargs, "kd_ratio": 0.0}
            )
            return result.loss, {"ce_loss": result.ce_loss}
        manifest = self.teacher_cache.manifest if self.teacher_cache is not None else {}
        sparse_kwargs = {
            **loss_kwargs,
            "cache_temperature": float(manifest.get("temperature", 1.0)),
            "teacher_vocab_size": manifest.get("vocab_size") or getattr(self.served_teacher, "vocab_size", None),
            "shared_vocab_size": self.shared_vocab_size,
            "teacher_tail_prior_logprobs": self._tail_prior_on(shift_labels.device),
        }
        shifted = [cached[name] for name in TEACHER_CACHE_COLUMNS]
        if chunked:
            result = losses.chunked_sparse_distillation_loss(
                outputs.hidden_states[-1][:, :-1],
                self._student_head(model),
                *shifted,
                shift_labels,
                chunk_size=args.loss_chunk_size,
                backend=args.loss_backend,
                **sparse_kwargs,
            )
        else:
            result = losses.sparse_distillation_loss(outputs.logits[:, :-1], *shifted, shift_labels, **sparse_kwargs)
        return result.loss, _statistics(result)

    def _live_teacher_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        outputs: Any,
        shift_labels: torch.Tensor,
        chunked: bool,
        want_layers: bool,
        loss_kwargs: dict[str, Any],
    ) -> tuple[Any, Any]:
        """The teacher's outputs on the batch and the loss against them (chunked from hidden states, or dense)."""
        args = self.args
        student_device = shift_labels.device
        teacher_head = self._teacher_head(student_device) if chunked else None
        teacher_outputs = self._teacher_forward(
            model, model_inputs, want_hidden=want_layers or teacher_head is not None, want_logits=teacher_head is None
        )
        if chunked:
            if teacher_head is not None:
                teacher_hidden = teacher_outputs.hidden_states[-1][:, :-1].to(student_device)
                if not bool(torch.isfinite(teacher_hidden).all()):
                    raise ValueError(
                        "the teacher's final hidden states hold NaN or inf values; its weights are broken or its "
                        "dtype overflows (try teacher_dtype='float32' or 'bfloat16')."
                    )
                teacher = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
            else:
                teacher = {"teacher_logits": teacher_outputs.logits[:, :-1].to(student_device)}
            result = losses.chunked_distillation_loss(
                outputs.hidden_states[-1][:, :-1],
                self._student_head(model),
                shift_labels,
                **teacher,
                chunk_size=args.loss_chunk_size,
                backend=args.loss_backend,
                **loss_kwargs,
            )
        else:
            result = losses.distillation_loss(
                outputs.logits[:, :-1], teacher_outputs.logits[:, :-1].to(student_device), shift_labels, **loss_kwargs
            )
        return teacher_outputs, result

    # ---------------------------------------------------------------- on-policy and sequence-level generation

    def _is_on_policy_step(self) -> bool:
        """Whether this optimizer step trains on student-generated text; drawn once per optimizer step, seeded by
        (seed, step), so all accumulation micro-batches of a step agree and resumed runs draw the same."""
        step = self.state.global_step
        if self._on_policy_decision is None or self._on_policy_decision[0] != step:
            self._on_policy_decision = (step, _draws_on_policy(self.args.seed, step, self.args.lmbda))
        return self._on_policy_decision[1]

    def _generate_batch(self, model: nn.Module, inputs: dict[str, Any], generator: str) -> dict[str, Any]:
        """The batch with its continuations replaced by text that `generator` ("student" or "teacher") samples."""
        return _generate_batch_for(self, model, inputs, generator)


# --------------------------------------------------------------------------------------------------------------


def _statistics(result: Any) -> dict[str, Any]:
    return {
        "kd_loss": result.kd_loss.detach() if torch.is_tensor(result.kd_loss) else result.kd_loss,
        "ce_loss": None if result.ce_loss is None else result.ce_loss.detach(),
        "top1_agreement": result.top1_agreement,
        "teacher_entropy": result.teacher_entropy,
        "student_entropy": result.student_entropy,
    }
