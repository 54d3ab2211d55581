"""Knowledge distillation between models whose tokenizers differ.

The collator (:class:`CrossTokenizerDistillationCollator`) tokenises raw text with both tokenizers and turns their
alignment (`hf_interop.text_alignment`) into flat index tensors; the loss
(`hf_interop.losses.cross_tokenizer.cross_tokenizer_distillation_loss`) gathers the needed rows of both models'
logits; :class:`CrossTokenizerDistillationTrainer` runs both models and logs the share of matched spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging_utils import get_logger
from ..losses.cross_tokenizer import cross_tokenizer_distillation_loss
from ..text_alignment import SpanAlignmentIndex, VocabularyMapping, build_vocabulary_mapping
from .cross_tokenizer_collator import CrossTokenizerDistillationCollator
from .cross_tokenizer_config import CrossTokenizerDistillationConfig
from .distillation_config import DistillationConfig
from .distillation_trainer import DistillationTrainer
from .served_teacher import online as served
from .served_teacher.client import is_served_teacher

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)


class CrossTokenizerDistillationTrainer(DistillationTrainer):
    r"""
    Distil a teacher into a student whose tokenizer differs, from raw text.

    The data collator (:class:`CrossTokenizerDistillationCollator`) tokenises each row's text with both tokenizers
    and aligns the tokens; the loss is :func:`cross_tokenizer_distillation_loss`: `kd_ratio` times the hybrid
    span-aligned loss (exact divergence on matched spans, ULD on unmatched spans) plus `1 - kd_ratio` times the
    student's cross-entropy, both normalised by the student's target tokens of the accumulated batch. Everything
    else (teacher placement, optimizer, logging, saving, model cards) is [`DistillationTrainer`]'s.

    Args:
        model (`PreTrainedModel` or `str`): the student.
        teacher_model (`PreTrainedModel` or `str`, *optional*):
            The teacher; defaults to `args.teacher_model_name_or_path`.
        args ([`CrossTokenizerDistillationConfig`]): training and distillation settings.
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Rows with raw text in `args.text_column` (see :func:`split_texts_into_chunks` for long documents).
        processing_class (`PreTrainedTokenizerBase`, *optional*): the student's tokenizer (required unless the
            student is given by name).
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*): the teacher's tokenizer (required unless
            it is saved next to the teacher's weights).
        **kwargs: passed to [`DistillationTrainer`] / `transformers.Trainer`.
    """

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: CrossTokenizerDistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = CrossTokenizerDistillationConfig(output_dir="cross_tokenizer_distillation_output")
        if not isinstance(args, CrossTokenizerDistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; CrossTokenizerDistillationTrainer needs a "
                "CrossTokenizerDistillationConfig(output_dir=..., ...)."
            )
        if teacher_model is None and args.teacher_model_name_or_path is None and args.teacher_url is None:
            raise ValueError(
                "teacher_model is required: pass the teacher (a model or a name/path) or set "
                "args.teacher_model_name_or_path (self-distillation needs no cross-tokenizer trainer)."
            )
        if kwargs.get("data_collator") is not None:
            raise ValueError(
                "data_collator is built by CrossTokenizerDistillationTrainer (it tokenises and aligns raw text); "
                "leave it out and set max_length / text_column / *_start_token in the config."
            )
        if isinstance(model, (str, Path)) and processing_class is None:
            from ..loading import load_tokenizer

            processing_class = load_tokenizer(model)
        if processing_class is None:
            raise ValueError(
                "processing_class (the student's tokenizer) is required for cross-tokenizer distillation."
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if isinstance(columns, list) and args.text_column not in columns:
                raise ValueError(
                    f"{name} has columns {columns} but no {args.text_column!r}; cross-tokenizer distillation needs "
                    "raw text (it tokenises with both tokenizers), so pass the untokenised dataset or set text_column."
                )
        self.vocabulary_mapping: VocabularyMapping | None = None
        self._span_counts = {"train": [0, 0], "eval": [0, 0]}
        collator = CrossTokenizerDistillationCollator(
            processing_class,
            None,
            max_length=args.max_length,
            alignment=args.alignment,
            text_column=args.text_column,
            student_start_token=args.student_start_token or None,
            teacher_start_token=args.teacher_start_token or None,
        )
        self._cross_tokenizer_collator = collator
        if args.teacher_url is not None or is_served_teacher(teacher_model):
            # a teacher behind a server: checked against its own tokenizer now; the parent only wires it in
            teacher_model = served.connect_cross_tokenizer_teacher(args, teacher_model, teacher_processing_class)
            self._use_teacher_tokenizer(
                model, processing_class, teacher_processing_class, len(teacher_model.table), args
            )
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            teacher_processing_class=teacher_processing_class,
            **kwargs,
        )

    def _check_teacher(
        self,
        student: Any,
        teacher: Any,
        processing_class: Any,
        teacher_processing_class: Any,
        args: DistillationConfig,
    ) -> None:
        # Overridden: the parent refuses tokenizers that differ, which is the point here. Builds the vocabulary
        # mapping and gives the collator the teacher's tokenizer instead.
        from .model_utils import _tokenizer_next_to, _vocab_size

        on_meta = [name for name, parameter in teacher.named_parameters() if parameter.device.type == "meta"]
        if on_meta:
            raise ValueError(
                f"teacher_model has {len(on_meta)} parameters on the meta device (e.g. {on_meta[0]!r}); load the "
                "teacher with its weights."
            )
        teacher_tokenizer = teacher_processing_class or _tokenizer_next_to(teacher)
        if teacher_tokenizer is None:
            raise ValueError(
                "teacher_processing_class (the teacher's tokenizer) is required for cross-tokenizer distillation: "
                "pass teacher_processing_class=AutoTokenizer.from_pretrained(<teacher>)."
            )
        self._use_teacher_tokenizer(student, processing_class, teacher_tokenizer, _vocab_size(teacher), args)

    def _use_teacher_tokenizer(
        self, student: Any, processing_class: Any, teacher_tokenizer: Any, teacher_vocab_size: int, args: Any
    ) -> None:
        """Give the collator the teacher's tokenizer and map the two vocabularies (spans aligned exactly)."""
        from .model_utils import _vocab_size

        self._cross_tokenizer_collator.set_teacher_tokenizer(teacher_tokenizer)
        if args.alignment == "spans" and args.loss_type != "uld":
            self.vocabulary_mapping = build_vocabulary_mapping(
                processing_class,
                teacher_tokenizer,
                student_vocab_size=_vocab_size(student),
                teacher_vocab_size=teacher_vocab_size,
                max_vocab_union_size=args.max_vocab_union_size,
                unmatched=args.unmatched_vocabulary,
            )
            logger.info(
                f"{self.vocabulary_mapping.num_matched} token strings are shared by the student "
                f"({self.vocabulary_mapping.student_vocab_size}) and teacher "
                f"({self.vocabulary_mapping.teacher_vocab_size}) vocabularies."
            )

    def _set_signature_columns_if_needed(self) -> None:
        # Private hook, overridden so that the Trainer's column pruning keeps the raw text the collator tokenises.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, self.args.text_column]))

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Student and teacher forward passes on their own tokenisations, then the cross-tokenizer loss."""

        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        index = SpanAlignmentIndex.from_batch(inputs, pop=True)
        teacher_inputs = {
            "input_ids": inputs.pop("teacher_input_ids"),
            "attention_mask": inputs.pop("teacher_attention_mask"),
        }
        labels = inputs.pop("labels")
        if num_items_in_batch is None:
            steps = self.current_gradient_accumulation_steps if model.training else 1
            num_items_in_batch = max(int((labels[:, 1:] != -100).sum()), 1) * steps
        if self.served_teacher is not None:  # its top-k answers, asked for when the batch was built
            when = f"at training step {self.state.global_step} ({mode})"
            columns, missing = served.take_answers(self.served_teacher, inputs, {}, when)
            teacher_logits = served.dense_teacher_log_probs(columns, len(self.served_teacher.table))
            index = served.drop_unanswered_spans(index, missing)
        outputs = model(**inputs, use_cache=False)
        if self.served_teacher is None:
            teacher_logits = self._teacher_forward(model, teacher_inputs, want_hidden=False, want_logits=True).logits
        args = self.args
        try:
            result = cross_tokenizer_distillation_loss(
                outputs.logits,
                teacher_logits.to(outputs.logits.device),
                labels,
                index,
                self.vocabulary_mapping,
                kd_ratio=args.kd_ratio,
                num_items_in_batch=num_items_in_batch,
                **args.span_loss_kwargs(),
            )
        except ValueError as error:
            raise ValueError(f"at training step {self.state.global_step} ({mode}): {error}") from error
        normalizer = float(num_items_in_batch)
        sums = self._metric_sums[mode]
        sums["num_tokens"] = sums.get("num_tokens", 0.0) + result.num_valid_tokens
        sums["kd_loss"] = sums.get("kd_loss", 0.0) + float(result.kd_loss.detach()) * normalizer
        sums["ce_loss"] = sums.get("ce_loss", 0.0) + float(result.ce_loss.detach()) * normalizer
        self._span_counts[mode][0] += result.spans.num_matched
        self._span_counts[mode][1] += result.spans.num_unmatched
        loss = result.loss
        if model.training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # same convention as DistillationTrainer.compute_loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `matched_span_fraction`: the share of aligned spans compared exactly (not by ULD)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        matched, unmatched = self._span_counts[mode]
        if matched + unmatched:
            logs[("eval_" if mode == "eval" else "") + "matched_span_fraction"] = matched / (matched + unmatched)
        self._span_counts[mode] = [0, 0]
        super().log(logs, start_time)
