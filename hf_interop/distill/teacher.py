"""The live teacher of `DistillationTrainer`: loading by name, placement on devices, its head on another device."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import losses
from ..loading import dispatch_loaded_model
from ..logging_utils import get_logger
from .model_utils import (
    _accepts_argument,
    _base_model,
    _has_output_head,
    _text_config,
    _tokenizer_next_to,
    _tokenizer_of,
    _tokenizers_agree,
    _vocab_size,
)

if TYPE_CHECKING:
    from .distillation_config import DistillationConfig

logger = get_logger(__name__)


class _DeviceBridgeHead(nn.Module):
    """A teacher head on another device: moves each hidden chunk there and its logits back."""

    def __init__(self, head: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.head = head
        self.head_device = device

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(hidden_states.to(self.head_device)).to(hidden_states.device)


def _infer_device_map(name_or_path: str, args: DistillationConfig) -> dict[str, Any]:
    """A device map for `teacher_device_map="auto"` that respects `teacher_max_memory` (computed on meta weights)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..utils import resolve_dtype

    gguf_file = None
    folder = name_or_path
    if name_or_path.endswith(".gguf"):
        folder, gguf_file = os.path.dirname(name_or_path) or ".", os.path.basename(name_or_path)
    config = AutoConfig.from_pretrained(folder, revision=args.teacher_revision, gguf_file=gguf_file)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    dtype = resolve_dtype(args.teacher_dtype)
    return infer_auto_device_map(
        skeleton,
        max_memory=args.teacher_max_memory,
        no_split_module_classes=skeleton._no_split_modules,
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )


def _load_teacher(name_or_path: str, args: DistillationConfig) -> tuple[nn.Module, Any]:
    """A teacher given by name, loaded with its tokenizer and placed by `teacher_device_map` / `teacher_max_memory`."""
    from ..loading import load_causal_lm

    device_map = args.teacher_device_map
    if args.teacher_max_memory is not None:
        device_map = _infer_device_map(name_or_path, args)
    teacher, tokenizer = load_causal_lm(
        name_or_path,
        revision=args.teacher_revision,
        dtype=args.teacher_dtype,
        device_map=device_map,
        allow_pickle=args.allow_pickle,
    )
    return teacher, tokenizer


def _place_teacher(trainer: Any, teacher: nn.Module, args: DistillationConfig) -> nn.Module:
    """The frozen teacher (eval mode, no gradients) placed for `trainer`'s run: by `teacher_device_map`, where the
    caller spread it, as a DeepSpeed engine, prepared for FSDP evaluation, or on the student's device."""
    teacher.eval()
    teacher.requires_grad_(False)
    device_map = getattr(teacher, "hf_device_map", None)
    if args.teacher_device_map is not None:
        if device_map is not None:
            return teacher  # loaded by name with the map: already dispatched by Accelerate
        return dispatch_loaded_model(teacher, args.teacher_device_map, args.teacher_max_memory)
    if device_map is not None and len({str(device) for device in device_map.values()}) > 1:
        return teacher  # the caller spread it over several devices (from_pretrained(device_map=...)): keep that
    if trainer.is_deepspeed_enabled:  # pragma: no cover - needs DeepSpeed and GPUs
        return _deepspeed_teacher_engine(teacher, trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    if trainer.is_fsdp_enabled:
        # evaluation mode: mixed precision only, never sharded or wrapped (each process holds the whole frozen
        # teacher, as under DDP); placed explicitly, because Accelerate places no model itself under FSDP
        teacher = trainer.accelerator.prepare_model(teacher, device_placement=True, evaluation_mode=True)
        teacher.eval()
        return teacher
    return teacher.to(trainer.args.device)


def _check_teacher_against_student(
    student: nn.Module,
    teacher: nn.Module,
    processing_class: Any,
    teacher_processing_class: Any,
    args: DistillationConfig,
) -> int | None:
    """Errors that can be seen before training: meta weights, vocabulary and tokenizer mismatches.

    Returns the number of tokens of the shared tokenizer when the two models' output heads differ only in padding,
    else `None`.
    """
    on_meta = [name for name, parameter in teacher.named_parameters() if parameter.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"teacher_model has {len(on_meta)} parameters on the meta device (e.g. {on_meta[0]!r}): it was built "
            "without weights (init_empty_weights / device 'meta'). Load the teacher with its weights, e.g. "
            "load_causal_lm(path) or from_pretrained(path), or pass its name/path as teacher_model."
        )
    if not _has_output_head(teacher) and args.hidden_loss_weight > 0:
        raise ValueError(
            f"hidden_loss_weight={args.hidden_loss_weight} needs the teacher's hidden states, but "
            f"{type(teacher).__name__} has no output head (e.g. an ensemble); set hidden_loss_weight=0."
        )
    student_vocab, teacher_vocab = _vocab_size(student), _vocab_size(teacher)
    student_tokenizer = _tokenizer_of(processing_class) if processing_class is not None else None
    teacher_tokenizer = _tokenizer_of(teacher_processing_class) if teacher_processing_class is not None else None
    if teacher_tokenizer is None:
        teacher_tokenizer = _tokenizer_next_to(teacher)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if not _tokenizers_agree(student_tokenizer, teacher_tokenizer):
            raise ValueError(
                f"teacher vocab_size {teacher_vocab} (tokenizer of {len(teacher_tokenizer)} tokens) and student "
                f"vocab_size {student_vocab} (tokenizer of {len(student_tokenizer)} tokens): their tokenizers map "
                "tokens to different ids, so their next-token distributions cannot be compared position by "
                "position. Use a teacher that shares the student's tokenizer, or cross-tokenizer distillation "
                '(`hf_interop.CrossTokenizerDistillationTrainer`, `loss_type="uld"` or `"gold"`).'
            )
    if student_vocab == teacher_vocab:
        return None
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            f"teacher vocab_size {teacher_vocab} != student vocab_size {student_vocab}. If both use the same "
            "tokenizer (embeddings padded to a multiple), pass processing_class=<student tokenizer> and "
            "teacher_processing_class=<teacher tokenizer> so the trainer can check that they map tokens to the "
            'same ids; if the tokenizers differ, use `hf_interop.CrossTokenizerDistillationTrainer` (`loss_type="uld"`).'
        )
    shared = min(len(student_tokenizer), len(teacher_tokenizer))
    if shared > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"the shared tokenizer has {shared} tokens but the teacher has vocab_size {teacher_vocab} and the "
            f"student {student_vocab}: one model has fewer output rows than the tokenizer has tokens. Resize "
            "its embeddings (model.resize_token_embeddings(len(tokenizer)))."
        )
    logger.info(
        f"teacher vocab_size {teacher_vocab} and student vocab_size {student_vocab} share one tokenizer; "
        f"comparing distributions over its first {shared} tokens."
    )
    return shared


def _deepspeed_teacher_engine(teacher: nn.Module, config: dict) -> nn.Module:  # pragma: no cover - needs DeepSpeed
    """An inference-mode DeepSpeed engine for the teacher with the student's ZeRO settings (no optimizer).

    Under ZeRO-3 the teacher is sharded like the student; otherwise every process holds a replica (stage 0).
    `config` is the student's DeepSpeed config, left unchanged.
    """
    import deepspeed

    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    hidden_size = getattr(_text_config(teacher), "hidden_size", None)
    if stage == 3 and hidden_size is not None:
        # bucket sizes the student's config may leave at "auto", which only the training engine would resolve
        zero.update(
            {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            }
        )
    # no optimizer or scheduler: DeepSpeed would otherwise build them (and their offload) for a frozen model
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    if stage != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _teacher_output_head(teacher: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The teacher's output head for the chunked loss, returning logits on `device`; `None` when the teacher's full
    logits must be used (no output head, e.g. an ensemble, or no `logits_to_keep`)."""
    if not _has_output_head(teacher) or not _accepts_argument(teacher, "logits_to_keep"):
        return None
    head = losses.output_logits_fn(teacher)
    head_device = _base_model(teacher).get_output_embeddings().weight.device
    return head if head_device == device else _DeviceBridgeHead(head, head_device)


def _self_distillation_output_head(student: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The head of a PeftModel student's base model (the teacher of self-distillation), or `None` with adapters on
    the head itself, whose disabled-adapter version exists only inside the teacher forward."""
    base = _base_model(student)
    head = base.get_output_embeddings()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # noqa: N806
    if isinstance(head, BaseTunerLayer):
        return None
    return losses.output_logits_fn(base)
