"""`MultiTeacherDistillationTrainer`: one student distilled from several teachers, routed or mixed.

Routing (`teacher_combination="route"`): every example names its teacher; each teacher runs only on its own rows
(cut to their longest attended length, so a batch mixing teachers wastes no teacher compute on padding) and the
loss of each group is the single-teacher loss of those rows, all normalised by the same count of valid target
tokens of the whole batch: the sum is exactly the per-token mean over the batch.

Mixing (`"mixture"` / `"product"`): every teacher runs on every row; their distributions at `temperature` are
combined with a weight vector per example (static or from each teacher's confidence on the example, see
:mod:`.combination`), and the student learns from the combined distribution with the configured divergence.

A single registered teacher in process takes exactly `DistillationTrainer`'s path (bit-identical results). Teachers
are models, names/paths (loaded, optionally lazily, and placed by Accelerate on their own devices) or URLs of
OpenAI-compatible servers (their top-k answers; in a mixture spread into a full distribution with a uniform tail).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ... import losses
from ...loading import dispatch_loaded_model, resolve_model_alias
from ...logging_utils import get_logger
from ...multitask.weighting import static_weighted_sum
from ...text_alignment import build_vocabulary_mapping
from ..distillation_trainer import DistillationTrainer, _statistics
from ..model_utils import _model_name, _tokenizer_next_to, _tokenizer_of, _tokenizers_agree, _vocab_size
from ..served_teacher import online as served
from ..served_teacher.client import ServedTeacher, is_teacher_url
from ..teacher import _check_teacher_against_student, _load_teacher, _place_teacher
from ..teacher_cache.reader import TeacherLogitsCache
from .cached import CACHE_ROW_PREFIX, is_cache_folder, with_cache_rows
from .collator import SERVED_ANSWERS_PREFIX, TEACHER_INDEX_KEY, MultiTeacherCollator, check_routing_column
from .combination import (
    check_route_weights,
    check_teacher_weights,
    combine_teacher_log_probs,
    sequence_confidence_scores,
    teacher_weights_per_example,
)
from .config import MultiTeacherDistillationConfig, check_teacher_names
from .cross_tokenizer import MultiTokenizerCollator, cross_tokenizer_loss

logger = get_logger(__name__)

# per teacher: tokens, KD sum, top-1 sum, weight sum, matched spans, all spans
_SLOTS = 6


class MultiTeacherDistillationTrainer(DistillationTrainer):
    """A [`DistillationTrainer`] whose student learns from several teachers (see the module docstring).

    Args:
        model (`PreTrainedModel` or `str`): the student, or its name/path.
        teachers (`dict[str, PreTrainedModel | str | ServedTeacher]`, *optional*):
            Teacher name -> model, hub id / folder / `.gguf` / alias, or `http(s)://` URL of an OpenAI-compatible
            server (or a `ServedTeacher`). Defaults to `args.teachers`.
        args (`MultiTeacherDistillationConfig`): the settings, including how the teachers are combined.
        teacher_processing_classes (`dict[str, PreTrainedTokenizerBase]`, *optional*):
            Tokenizers of teachers given as model objects whose tokenizer is not saved next to their weights.
        data_collator, train_dataset, eval_dataset, processing_class, peft_config, **kwargs:
            As [`DistillationTrainer`]. With routing, both datasets need the `args.teacher_column` column.
    """

    def __init__(
        self,
        model: Any = None,
        teachers: dict[str, Any] | None = None,
        args: MultiTeacherDistillationConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_processing_classes: dict[str, Any] | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if "teacher_model" in kwargs:
            raise ValueError(
                "MultiTeacherDistillationTrainer takes teachers={name: teacher, ...}, not teacher_model=; for one "
                "teacher use DistillationTrainer or teachers={'teacher': model}."
            )
        args = self._checked_config(args)
        teachers = teachers if teachers is not None else args.teachers
        check_teacher_names(teachers)
        self.teacher_names = list(teachers)
        args.check_against_teachers(self.teacher_names)
        unknown = sorted(set(teacher_processing_classes or {}) - set(self.teacher_names))
        if unknown:
            raise ValueError(
                f"teacher_processing_classes names unknown teacher(s) {unknown}; the teachers are "
                f"{self.teacher_names}."
            )
        if args.lmbda > 0 or args.seq_kd:
            raise ValueError(
                f"lmbda={args.lmbda} / seq_kd={args.seq_kd}: generated-text steps are not supported with several "
                "teachers yet (which teacher scores a generated continuation is not defined); set lmbda=0, seq_kd=False."
            )
        self.routing = args.teacher_combination == "route"
        if self.routing:  # cheap checks first, before any model is loaded
            check_routing_column(train_dataset, args.teacher_column, self.teacher_names, "train_dataset")
            check_routing_column(eval_dataset, args.teacher_column, self.teacher_names, "eval_dataset")
        self.static_weights = check_teacher_weights(args.teacher_weights, self.teacher_names)
        self.route_weights = check_route_weights(args.route_weights, self.teacher_names)
        self._teacher_sources = dict(teachers)
        self._config = args  # read while the teachers are registered, before Trainer.__init__ sets self.args
        self._teacher_tokenizers = dict(teacher_processing_classes or {})
        self.teachers: dict[str, Any] = {}  # name -> placed model, ServedTeacher, or None until loaded (lazy)
        self._shared_vocab: dict[str, int | None] = {}
        self._teacher_sums: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self._batch_routing: torch.Tensor | None = None
        self._batch_answers: dict[str, Any] = {}
        self._mappings: dict[str, Any] = {}  # cross_tokenizer: each teacher's vocabulary mapping to the student's
        self._cross = None
        if args.cross_tokenizer:
            processing_class = self._cross_tokenizer_inputs(
                model, args, data_collator, train_dataset, eval_dataset, processing_class
            )
            self._cross = data_collator = MultiTokenizerCollator(processing_class, args)
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        served_teachers = {name: t for name, t in self.teachers.items() if isinstance(t, ServedTeacher)}
        caches = {name: t for name, t in self.teachers.items() if isinstance(t, TeacherLogitsCache)}
        for name, cache in caches.items():  # each row's row in each cache, checked by the caches' fingerprints
            column = args.teacher_column if self.routing else None
            self.train_dataset = with_cache_rows(self.train_dataset, name, cache, column)
            if self.eval_dataset is not None and not self.routing:
                raise ValueError(
                    f"teacher {name!r} is a cache, which holds no distributions for eval_dataset's rows, so the "
                    "mixture cannot be formed there; leave eval_dataset out or use in-process or served teachers."
                )
        if self.teacher_model is None:  # several teachers (one in process takes DistillationTrainer's path)
            for name, teacher in self.teachers.items():
                if isinstance(teacher, nn.Module):
                    self.teachers[name] = self._place(name, teacher)
        self.data_collator = MultiTeacherCollator(
            self.data_collator,
            self.teacher_names,
            args.teacher_column if self.routing else None,
            served_teachers if self.teacher_model is None else {},
            caches,
        )

    # ---------------------------------------------------------------- construction

    @staticmethod
    def _checked_config(args: Any) -> MultiTeacherDistillationConfig:
        if args is None:
            raise ValueError(
                "args is required: MultiTeacherDistillationConfig(output_dir=..., teachers={...}, "
                "teacher_combination='route' | 'mixture' | 'product')."
            )
        if not isinstance(args, MultiTeacherDistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; MultiTeacherDistillationTrainer needs a "
                "hf_interop.MultiTeacherDistillationConfig (a DistillationConfig with the teachers' settings)."
            )
        return args

    @staticmethod
    def _cross_tokenizer_inputs(
        model: Any, args: Any, data_collator: Any, train_dataset: Any, eval_dataset: Any, processing_class: Any
    ) -> Any:
        """With `cross_tokenizer=True`: the student's tokenizer, after checking the data holds raw text."""
        if data_collator is not None:
            raise ValueError(
                "data_collator is built by the trainer with cross_tokenizer=True (it tokenises raw text for the "
                "student and every teacher); leave it out and set max_length / text_column in the config."
            )
        for argument, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if isinstance(columns, list) and args.text_column not in columns:
                raise ValueError(
                    f"{argument} has columns {columns} but no {args.text_column!r}; with cross_tokenizer=True every "
                    "model tokenises the raw text itself, so pass the untokenised dataset or set text_column."
                )
        if processing_class is None and isinstance(model, (str, os.PathLike)):
            from ...loading import load_tokenizer

            processing_class = load_tokenizer(model)
        if processing_class is None:
            raise ValueError("processing_class (the student's tokenizer) is required with cross_tokenizer=True.")
        return processing_class

    def _use_live_teacher(
        self, model: nn.Module, teacher_model: Any, args: Any, processing_class: Any, teacher_processing_class: Any
    ) -> None:
        """Every teacher registered and checked against the student (loaded now unless lazily loaded)."""
        for name, source in self._teacher_sources.items():
            try:
                self._register_teacher(name, source, model, processing_class)
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
                hint = ""
                if "tokenizer" in str(error) and not args.cross_tokenizer:
                    hint = " With several teachers, set cross_tokenizer=True to distil from teachers whose tokenizers differ."
                raise ValueError(f"teacher {name!r} ({_describe(source)}) cannot be used: {error}{hint}") from error
        only = self.teacher_names[0]
        own_map = only in (args.teacher_device_maps or {})
        if len(self.teacher_names) == 1 and isinstance(self.teachers[only], nn.Module) and not own_map:
            # one in-process teacher: exactly DistillationTrainer's path (placed by it, chunked head and all)
            self.teacher_model = self.teachers[only]
            self.shared_vocab_size = self._shared_vocab[only]
        self.teacher_name_or_path = ", ".join(self.teacher_names)

    def _register_teacher(self, name: str, source: Any, student: nn.Module, processing_class: Any) -> None:
        args = self._config
        if isinstance(source, TeacherLogitsCache) or is_cache_folder(source):
            self._use_cache(name, source, student, processing_class)
            return
        if isinstance(source, ServedTeacher) or (isinstance(source, str) and is_teacher_url(source)):
            if args.cross_tokenizer:
                raise ValueError(
                    "served teachers are not supported with cross_tokenizer=True yet; run that teacher in process, "
                    "or distil from it alone with CrossTokenizerDistillationTrainer(teacher_model=<url>)."
                )
            teacher, shared = served.connect_served_teacher(args, source, processing_class, _vocab_size(student))
            self.teachers[name], self._shared_vocab[name] = teacher, shared
            return
        tokenizer = self._teacher_tokenizers.get(name)
        if isinstance(source, (str, os.PathLike)):
            source = resolve_model_alias(str(source))
            self._teacher_sources[name] = source
            if args.lazy_teacher_loading:
                self._check_lazy_teacher(name, source, student, processing_class)
                self.teachers[name] = None
                return
            teacher, loaded_tokenizer = self._load(name, source)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif isinstance(source, nn.Module):
            teacher = source
        else:
            raise ValueError(
                f"{type(source).__name__} is not a teacher; pass a causal LM, a hub id / folder / .gguf path, or an "
                "http(s) URL of an OpenAI-compatible server."
            )
        if args.cross_tokenizer:
            on_meta = [key for key, parameter in teacher.named_parameters() if parameter.device.type == "meta"]
            if on_meta:
                raise ValueError(f"{len(on_meta)} parameters are on the meta device (e.g. {on_meta[0]!r}).")
            tokenizer = tokenizer if tokenizer is not None else _tokenizer_next_to(teacher)
            self._use_teacher_tokenizer(name, tokenizer, _vocab_size(teacher), student, processing_class)
        else:
            self._shared_vocab[name] = _check_teacher_against_student(
                student, teacher, processing_class, tokenizer, args
            )
        self.teachers[name] = teacher

    def _use_cache(self, name: str, source: Any, student: nn.Module, processing_class: Any) -> None:
        """A teacher read from its teacher-logits cache (checksums verified, tokenizer checked)."""
        args = self._config
        if args.cross_tokenizer:
            raise ValueError(
                "cached teachers are not supported with cross_tokenizer=True; run the teacher in process."
            )
        if self.routing and args.loss_type not in losses.SPARSE_LOSS_TYPES:
            raise ValueError(
                f"loss_type={args.loss_type!r} cannot be computed from a top-k teacher cache; use one of "
                f"{list(losses.SPARSE_LOSS_TYPES)}, or teacher_combination='mixture'."
            )
        cache = source if isinstance(source, TeacherLogitsCache) else TeacherLogitsCache.load(source)
        cache.check_compatible(tokenizer=processing_class)
        cache.check_loss(args.loss_type, args.temperature)  # a sampled cache: forward KL at its temperature only
        if cache.sample_draws is not None and args.teacher_combination == "product":
            raise ValueError(
                f"teacher {name!r} is a sampled cache (draw frequencies): a product of distributions is not linear in "
                "them, so it would be biased; use teacher_combination='route' or 'mixture', or a compact cache."
            )
        self.teachers[name] = cache
        self._shared_vocab[name] = None
        if cache.vocab_size != _vocab_size(student) and processing_class is not None:
            self._shared_vocab[name] = len(_tokenizer_of(processing_class))

    def _use_teacher_tokenizer(
        self, name: str, tokenizer: Any, teacher_vocab: int, student: nn.Module, processing_class: Any
    ) -> None:
        """Across tokenizers: the collator tokenises for this teacher, its vocabulary is mapped to the student's."""
        args = self._config
        if tokenizer is None:
            raise ValueError(
                f"its tokenizer is not known (none saved next to its weights); pass "
                f"teacher_processing_classes={{{name!r}: tokenizer}}."
            )
        self._cross.add_teacher(name, tokenizer)
        self._shared_vocab[name] = None
        if args.alignment == "spans" and args.loss_type != "uld":
            self._mappings[name] = build_vocabulary_mapping(
                processing_class,
                tokenizer,
                student_vocab_size=_vocab_size(student),
                teacher_vocab_size=teacher_vocab,
                max_vocab_union_size=args.max_vocab_union_size,
                unmatched=args.unmatched_vocabulary,
            )

    def _load(self, name: str, source: str) -> tuple[nn.Module, Any]:
        """A teacher loaded by name, dispatched by its own device map when `teacher_device_maps` names it."""
        device_maps = self._config.teacher_device_maps or {}
        if name not in device_maps:
            return _load_teacher(source, self._config)
        from ...loading import load_causal_lm

        return load_causal_lm(
            source,
            revision=self._config.teacher_revision,
            dtype=self._config.teacher_dtype,
            device_map=device_maps[name],
            allow_pickle=self._config.allow_pickle,
        )

    def _check_lazy_teacher(self, name: str, source: str, student: nn.Module, processing_class: Any) -> None:
        """What can be checked without the weights: the config loads, the tokenizer agrees with the student's."""
        from transformers import AutoConfig

        from ...loading import load_tokenizer

        folder, gguf = (source, None)
        if source.endswith(".gguf"):
            folder, gguf = os.path.dirname(source) or ".", os.path.basename(source)
        config = AutoConfig.from_pretrained(folder, revision=self._config.teacher_revision, gguf_file=gguf)
        tokenizer = self._teacher_tokenizers.get(name)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, revision=self._config.teacher_revision)
        teacher_vocab = getattr(getattr(config, "text_config", config), "vocab_size", None)
        if self._config.cross_tokenizer:
            self._use_teacher_tokenizer(name, tokenizer, teacher_vocab, student, processing_class)
            return
        student_tokenizer = _tokenizer_of(processing_class) if processing_class is not None else None
        if student_tokenizer is not None and not _tokenizers_agree(student_tokenizer, _tokenizer_of(tokenizer)):
            raise ValueError(
                "its tokenizer maps tokens to different ids than the student's; use teachers that share the "
                "student's tokenizer, or set cross_tokenizer=True (raw text, teachers aligned by spans)."
            )
        student_vocab = _vocab_size(student)
        self._shared_vocab[name] = None if teacher_vocab in (None, student_vocab) else len(_tokenizer_of(tokenizer))

    def _place(self, name: str, teacher: nn.Module) -> nn.Module:
        """Frozen, eval mode, on its own device map (already dispatched when loaded with one) or as one teacher."""
        device_maps = self.args.teacher_device_maps or {}
        if name in device_maps:
            teacher.eval()
            teacher.requires_grad_(False)
            if getattr(teacher, "hf_device_map", None) is None:
                teacher = dispatch_loaded_model(teacher, device_maps[name], None)
        else:
            teacher = _place_teacher(self, teacher, self.args)
        return teacher

    def _teacher(self, name: str) -> Any:
        """The teacher called `name`, loaded and placed now when it was registered lazily."""
        teacher = self.teachers[name]
        if teacher is None:
            logger.info(f"Loading teacher {name!r} from {self._teacher_sources[name]} (first batch that needs it).")
            try:
                teacher, _ = self._load(name, self._teacher_sources[name])
            except (OSError, RuntimeError, ValueError) as error:
                raise ValueError(
                    f"teacher {name!r} ({self._teacher_sources[name]}) failed to load: {error}"
                ) from error
            teacher = self._place(name, teacher)
            self.teachers[name] = teacher
        return teacher

    def _set_signature_columns_if_needed(self) -> None:
        # Private hook, overridden so that the Trainer's column pruning keeps the routing column for the collator.
        super()._set_signature_columns_if_needed()
        kept = [self.args.teacher_column] if self.routing else []
        if self.args.cross_tokenizer:
            kept.append(self.args.text_column)
        kept += [CACHE_ROW_PREFIX + name for name, t in self.teachers.items() if isinstance(t, TeacherLogitsCache)]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *kept]))

    # ---------------------------------------------------------------- the loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """`DistillationTrainer.compute_loss` with the batch's routing and served answers taken out first."""
        inputs = dict(inputs)
        self._batch_routing = inputs.pop(TEACHER_INDEX_KEY, None)
        self._batch_answers = {key: inputs.pop(key) for key in list(inputs) if key.startswith(SERVED_ANSWERS_PREFIX)}
        if self.args.cross_tokenizer:
            mode = "train" if model.training else "eval"
            try:
                loss, outputs = cross_tokenizer_loss(self, model, inputs, num_items_in_batch)
            except ValueError as error:
                raise ValueError(f"at training step {self.state.global_step} ({mode}): {error}") from error
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _distillation_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        shift_labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int,
        cached: dict[str, torch.Tensor],
        chunked: bool,
    ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        if self.teacher_model is not None:  # one in-process teacher
            loss, outputs, statistics = super()._distillation_loss(
                model, model_inputs, shift_labels, num_items_in_batch, cached, chunked
            )
            self._record(
                model, self.teacher_names[0], statistics, int((shift_labels != -100).sum()), num_items_in_batch
            )
            return loss, outputs, statistics
        loss_kwargs = {**self.args.loss_kwargs(), "num_items_in_batch": num_items_in_batch}
        outputs = self._run_student(model, model_inputs, chunked)
        if self.routing:
            loss, statistics = self._routed_loss(model, model_inputs, outputs, shift_labels, chunked, loss_kwargs)
        else:
            loss, statistics = self._combined_loss(model, model_inputs, outputs, shift_labels, chunked, loss_kwargs)
        return loss, outputs, statistics

    def _routed_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        outputs: Any,
        shift_labels: torch.Tensor,
        chunked: bool,
        loss_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Each teacher's single-teacher loss on its own rows; their (route-weighted) sum is the batch's loss."""
        if self._batch_routing is None:
            raise ValueError(
                f"the batch has no {TEACHER_INDEX_KEY}: with teacher_combination='route' every row needs its "
                f"teacher in column {self.args.teacher_column!r} (and the trainer's own collator wraps yours)."
            )
        routing = self._batch_routing.to(shift_labels.device)
        losses, weights, parts = [], [], []
        for position, name in enumerate(self.teacher_names):
            rows = (routing == position).nonzero().flatten()
            if rows.numel() == 0:
                continue
            sub_inputs, sub_outputs, sub_labels, width = _rows_of(model_inputs, outputs, shift_labels, rows, chunked)
            result = self._one_teacher_loss(
                name, model, sub_inputs, sub_outputs, sub_labels, chunked, loss_kwargs, width
            )
            statistics = _statistics(result)
            num_tokens = int((sub_labels != -100).sum())
            self._record(model, name, statistics, num_tokens, loss_kwargs["num_items_in_batch"])
            parts.append((statistics, num_tokens))
            losses.append(result.loss)
            weights.append(self.route_weights[position])
        return static_weighted_sum(losses, weights), _summed_statistics(parts)

    def _one_teacher_loss(
        self,
        name: str,
        model: nn.Module,
        inputs: dict[str, Any],
        outputs: Any,
        shift_labels: torch.Tensor,
        chunked: bool,
        loss_kwargs: dict[str, Any],
        width: int,
    ) -> Any:
        """The single-teacher loss of `name` on these rows (DistillationTrainer's own code, this teacher in place)."""
        teacher = self._teacher(name)
        kwargs = {**loss_kwargs, "shared_vocab_size": self._shared_vocab[name]}
        with self._as_the_teacher(name, teacher):
            if _is_sparse(teacher):
                columns, missing = self._answers(name, width, shift_labels.device)
                if missing is not None:
                    shift_labels = shift_labels.masked_fill(missing, -100)
                loss, statistics = self._cached_teacher_loss(model, outputs, shift_labels, columns, chunked, kwargs)
                return types.SimpleNamespace(loss=loss, **_as_result(statistics))
            _, result = self._live_teacher_loss(model, inputs, outputs, shift_labels, chunked, False, kwargs)
            return result

    @contextlib.contextmanager
    def _as_the_teacher(self, name: str, teacher: Any) -> Iterator[None]:
        # DistillationTrainer's loss helpers read the one teacher from these attributes: point them at `name`'s.
        saved = (self.teacher_model, self.served_teacher, self.teacher_cache, self.shared_vocab_size)
        self.teacher_model = self.served_teacher = self.teacher_cache = None
        if isinstance(teacher, ServedTeacher):
            self.served_teacher = teacher
        elif isinstance(teacher, TeacherLogitsCache):
            self.teacher_cache = teacher
        else:
            self.teacher_model = teacher
        self.shared_vocab_size = self._shared_vocab[name]
        try:
            yield
        finally:
            self.teacher_model, self.served_teacher, self.teacher_cache, self.shared_vocab_size = saved

    def _answers(self, name: str, width: int, device: torch.device) -> tuple[dict[str, torch.Tensor], Any]:
        """A served teacher's answers for its rows of this batch, cut to the rows' `width` tokens."""
        entry = self._batch_answers.get(f"{SERVED_ANSWERS_PREFIX}{name}")
        if entry is None:
            if isinstance(self.teachers[name], TeacherLogitsCache):  # evaluation rows: no cached distributions
                return {}, None
            raise ValueError(f"the batch holds no answers of served teacher {name!r}; use the trainer's own collator.")
        _, pending = entry
        teacher = self.teachers[name]
        if isinstance(pending, served.PendingAnswers):
            columns, missing = pending.resolve(device)
            teacher.statistics["wait_seconds"] = teacher.statistics.get("wait_seconds", 0.0) + pending.wait_seconds
        else:
            columns, missing = pending
        columns = {key: value[:, : width - 1].to(device) for key, value in columns.items()}
        return columns, missing[:, : width - 1].to(device)

    def _teacher_log_probs(self, name: str, model_inputs: dict[str, Any], width: int) -> torch.Tensor:
        """`(B, S-1, width)` float32 log-probabilities (temperature 1) of teacher `name` on the whole batch."""
        teacher = self._teacher(name)
        device = model_inputs["input_ids"].device
        if _is_sparse(teacher):
            columns, _ = self._answers(name, model_inputs["input_ids"].shape[1], device)
            dense = served.dense_teacher_log_probs(columns, teacher.vocab_size)[:, :-1]
        else:
            with self._as_the_teacher(name, teacher):
                logits = self._teacher_forward(None, model_inputs, want_hidden=False, want_logits=True).logits
            dense = logits[:, :-1].to(device)
        return torch.log_softmax(dense[..., :width].float(), dim=-1)

    def _combined_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        outputs: Any,
        shift_labels: torch.Tensor,
        chunked: bool,
        loss_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss against the teachers' mixture or product, with per-example weights."""
        args = self.args
        student_width = _vocab_size(self.accelerator.unwrap_model(model))
        widths = [student_width] + [self._width(name) for name in self.teacher_names]
        width = min(widths)
        log_probs = torch.stack([self._teacher_log_probs(name, model_inputs, width) for name in self.teacher_names])
        scores = None
        if args.teacher_weighting == "confidence":
            scores = sequence_confidence_scores(log_probs, shift_labels)
        weights = teacher_weights_per_example(
            log_probs.shape[1],
            self.static_weights,
            confidence_scores=scores,
            confidence_temperature=args.confidence_temperature,
            device=log_probs.device,
        )
        temperature = args.temperature
        tempered = log_probs if temperature == 1.0 else torch.log_softmax(log_probs / temperature, dim=-1)
        combined = combine_teacher_log_probs(tempered, weights, rule=args.teacher_combination)
        # the loss divides the teacher's logits by the temperature: hand it T * log q so that it sees q itself
        kwargs = {**loss_kwargs, "shared_vocab_size": width if width != student_width else None}
        result = self._loss_against(model, outputs, shift_labels, combined * temperature, chunked, kwargs)
        num_tokens = int((shift_labels != -100).sum())
        self._weight_sums(model, weights, shift_labels)
        if args.per_teacher_metrics:
            with torch.no_grad():
                for position, name in enumerate(self.teacher_names):
                    alone = self._loss_against(
                        model,
                        outputs,
                        shift_labels,
                        tempered[position] * temperature,
                        chunked,
                        {**kwargs, "kd_ratio": 1.0},
                    )
                    self._record(model, name, _statistics(alone), num_tokens, kwargs["num_items_in_batch"])
        return result.loss, _statistics(result)

    def _width(self, name: str) -> int:
        teacher = self._teacher(name)
        if _is_sparse(teacher):
            return self._shared_vocab[name] or teacher.vocab_size
        return self._shared_vocab[name] or _vocab_size(self.accelerator.unwrap_model(teacher))

    def _loss_against(
        self,
        model: nn.Module,
        outputs: Any,
        shift_labels: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunked: bool,
        kwargs: dict[str, Any],
    ) -> Any:
        if chunked:
            hidden = outputs.hidden_states[-1][:, :-1]
            if not torch.is_grad_enabled():
                hidden = hidden.detach()
            return losses.chunked_distillation_loss(
                hidden,
                self._student_head(model),
                shift_labels,
                teacher_logits=teacher_logits,
                chunk_size=self.args.loss_chunk_size,
                backend=self.args.loss_backend,
                **kwargs,
            )
        return losses.distillation_loss(outputs.logits[:, :-1], teacher_logits, shift_labels, **kwargs)

    # ---------------------------------------------------------------- per-teacher metrics and the model card

    def _record(
        self,
        model: nn.Module,
        name: str,
        statistics: dict[str, Any],
        num_tokens: int,
        normalizer: Any,
        spans: tuple[int, int] | None = None,
    ) -> None:
        """Adds one group's statistics to teacher `name`'s sums (`spans`: its matched and all aligned spans)."""
        sums = self._teacher_sums["train" if model.training else "eval"].setdefault(name, [0.0] * _SLOTS)
        kd_loss, top1 = statistics.get("kd_loss"), statistics.get("top1_agreement")
        sums[0] += num_tokens
        if kd_loss is not None:  # kd_loss is (sum over these tokens) / normalizer: keep the sum
            sums[1] += float(kd_loss) * float(normalizer)
        if top1 is not None:
            sums[2] += float(top1) * num_tokens
        if spans is not None:
            sums[4] += spans[0]
            sums[5] += spans[1]

    def _weight_sums(self, model: nn.Module, weights: torch.Tensor, shift_labels: torch.Tensor) -> None:
        """Token-weighted mean weight of each teacher, logged as `teacher_weight/<name>`."""
        tokens = (shift_labels != -100).sum(-1).to(weights)
        per_teacher = (weights * tokens[:, None]).sum(0).tolist()
        mode = "train" if model.training else "eval"
        for name, value in zip(self.teacher_names, per_teacher, strict=True):
            self._teacher_sums[mode].setdefault(name, [0.0] * _SLOTS)[3] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `kd_loss/<name>`, `top1_agreement/<name>` and the share of tokens (routing) or mean weight (mixing)
        of every teacher (across tokenizers also `matched_span_fraction/<name>`), token-weighted over the steps since
        the last log and over processes."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        sums = self._teacher_sums[mode]
        values = torch.tensor(
            [sums.get(name, [0.0] * _SLOTS) for name in self.teacher_names],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        total_tokens = float(values[:, 0].sum()) if self.routing else None
        for name, row in zip(self.teacher_names, values.tolist(), strict=True):
            tokens, kd_sum, top1_sum, weight_sum, matched_spans, all_spans = row
            if all_spans > 0:  # across tokenizers: the share of this teacher's spans compared exactly
                logs[f"{prefix}matched_span_fraction/{name}"] = matched_spans / all_spans
            if tokens <= 0:
                continue
            logs[f"{prefix}kd_loss/{name}"] = kd_sum / tokens
            logs[f"{prefix}top1_agreement/{name}"] = top1_sum / tokens
            if self.routing:
                logs[f"{prefix}teacher_share/{name}"] = tokens / total_tokens
            else:
                logs[f"{prefix}teacher_weight/{name}"] = weight_sum / tokens
        self._teacher_sums[mode] = {}
        super().log(logs, start_time)

    def card_teachers(self) -> list[dict[str, Any]]:
        """The model card's lineage: every teacher with its source, revision and role in the training."""
        lineage = []
        for name, weight in zip(self.teacher_names, self.static_weights, strict=True):
            teacher = self.teachers.get(name)
            source = self._teacher_sources[name]
            revision = self.args.teacher_revision
            if isinstance(teacher, ServedTeacher):
                source, revision = f"{teacher.model} (served at {teacher.url})", teacher.model_info.get("revision")
            elif isinstance(teacher, TeacherLogitsCache):
                manifest = teacher.manifest
                source = f"{manifest.get('teacher') or 'teacher'} (cache {teacher.path})"
                revision = manifest.get("teacher_revision") or manifest.get("revision")
            elif not isinstance(source, (str, os.PathLike)):
                source = _model_name(source) or type(source).__name__
            if self.routing:
                role = f"teacher {name!r}: examples whose {self.args.teacher_column!r} is {name!r}"
            else:
                role = f"teacher {name!r}: {self.args.teacher_combination}, {self.args.teacher_weighting} weight {weight:.3g}"
            lineage.append({"name_or_path": str(source), "revision": revision, "role": role})
        return lineage


# --------------------------------------------------------------------------------------------------------------


def _is_sparse(teacher: Any) -> bool:
    """A teacher known by its top-k answers (a server or a cache) rather than by a model in this process."""
    return isinstance(teacher, (ServedTeacher, TeacherLogitsCache))


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _rows_of(
    model_inputs: dict[str, Any], outputs: Any, shift_labels: torch.Tensor, rows: torch.Tensor, chunked: bool
) -> tuple[dict[str, Any], Any, torch.Tensor, int]:
    """The batch restricted to `rows`, cut after their last attended token (right padding), and its width."""
    batch_size, width = model_inputs["input_ids"].shape
    if rows.numel() == batch_size:
        return model_inputs, outputs, shift_labels, width
    mask = model_inputs.get("attention_mask")
    if mask is not None:
        attended = mask[rows].bool()
        last = attended.long().cumsum(-1).argmax(-1)  # the last attended position of each row
        right_padded = bool((attended.long().sum(-1) == last + 1).all())
        width = int(last.max()) + 1 if right_padded else width
        width = max(width, 2)
    sub_inputs = {
        key: value[rows][:, :width] if torch.is_tensor(value) and value.dim() == 2 else value
        for key, value in model_inputs.items()
    }
    hidden = outputs.hidden_states[-1][rows][:, :width] if chunked else None
    logits = None if chunked else outputs.logits[rows][:, :width]
    sub_outputs = types.SimpleNamespace(hidden_states=(hidden,), logits=logits)
    return sub_inputs, sub_outputs, shift_labels[rows][:, : width - 1], width


def _as_result(statistics: dict[str, Any]) -> dict[str, Any]:
    names = ("kd_loss", "ce_loss", "top1_agreement", "teacher_entropy", "student_entropy")
    return {name: statistics.get(name) for name in names}


def _summed_statistics(parts: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """Statistics of the routed groups put together: losses add (one shared normaliser), per-token means are
    token-weighted."""
    total_tokens = sum(tokens for _, tokens in parts)
    summed: dict[str, Any] = {}
    for name in ("kd_loss", "ce_loss"):
        values = [statistics[name] for statistics, _ in parts if statistics.get(name) is not None]
        summed[name] = sum(values) if values else None
    for name in ("top1_agreement", "teacher_entropy", "student_entropy"):
        values = [(statistics[name], tokens) for statistics, tokens in parts if statistics.get(name) is not None]
        summed[name] = (
            sum(float(value) * tokens for value, tokens in values) / max(total_tokens, 1) if values else None
        )
    return summed
