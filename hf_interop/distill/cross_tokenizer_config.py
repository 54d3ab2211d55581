"""Configuration of cross-tokenizer distillation: a `DistillationConfig` plus alignment and hybrid-loss settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..losses.cross_tokenizer import DEFAULT_MATCHED_WEIGHT, DEFAULT_UNMATCHED_WEIGHT
from ..text_alignment import ALIGNMENT_MODES, DEFAULT_MAX_VOCAB_UNION_SIZE, UNMATCHED_VOCABULARY
from .distillation_config import DistillationConfig

#: `loss_type` values of :class:`CrossTokenizerDistillationConfig`: the hybrid loss with forward KL / reverse KL /
#: JSD on matched spans, `"gold"` (the hybrid loss with JSD on matched spans, as TRL's GOLD) and `"uld"` (ULD on
#: every span).
CROSS_TOKENIZER_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "gold", "uld")


@dataclass
class CrossTokenizerSettings:
    """The alignment and hybrid-loss settings of distillation across tokenizers (see
    [`CrossTokenizerDistillationConfig`] for their documentation), shared by the configs that distil across
    tokenizers."""

    matched_weight: float = field(
        default=DEFAULT_MATCHED_WEIGHT, metadata={"help": "Weight (>= 0) of the divergence on matched spans."}
    )
    unmatched_weight: float = field(
        default=DEFAULT_UNMATCHED_WEIGHT, metadata={"help": "Weight (>= 0) of the ULD distance on unmatched spans."}
    )
    uld_top_k: int | None = field(
        default=None, metadata={"help": "Exact ULD over the top-k probabilities only (faster); None = exact."}
    )
    alignment: str = field(
        default="spans",
        metadata={
            "help": "spans (offset alignment) or positions (no alignment, ULD).",
            "choices": list(ALIGNMENT_MODES),
        },
    )
    max_length: int = field(default=256, metadata={"help": "Student tokens per row, start token included."})
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the raw text."})
    student_start_token: str = field(
        default="auto", metadata={"help": "Token before each row's student tokens: auto (BOS, else EOS), '' = none."}
    )
    teacher_start_token: str = field(
        default="auto", metadata={"help": "Token before each row's teacher tokens: auto (BOS, else EOS), '' = none."}
    )
    max_vocab_union_size: int = field(
        default=DEFAULT_MAX_VOCAB_UNION_SIZE,
        metadata={"help": "Largest allowed union of the two vocabularies (memory cap)."},
    )
    unmatched_vocabulary: str = field(
        default="bucket",
        metadata={
            "help": "On matched spans, teacher tokens without a same-string student token: bucket (one rest "
            "bucket) or prefix (each counts for the student token of its longest prefix).",
            "choices": list(UNMATCHED_VOCABULARY),
        },
    )

    def span_loss_kwargs(self) -> dict[str, Any]:
        """The settings of the span-aligned hybrid loss (matched spans by divergence, the rest by ULD)."""
        return dict(
            loss_type=self.matched_loss_type,
            temperature=self.temperature,
            jsd_beta=self.jsd_beta,
            scale_by_temperature_squared=self.scale_by_temperature_squared,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            uld_top_k=self.uld_top_k,
        )

    def _check_cross_tokenizer_settings(self) -> None:
        for name in ("matched_weight", "unmatched_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0; use 0.0 to turn that part off.")
        if self.uld_top_k is not None and self.uld_top_k < 1:
            raise ValueError(f"uld_top_k={self.uld_top_k} must be >= 1, or None for the exact ULD distance.")
        if self.alignment not in ALIGNMENT_MODES:
            raise ValueError(f"alignment={self.alignment!r} is not supported; use one of {list(ALIGNMENT_MODES)}.")
        if self.alignment == "positions" and self.loss_type != "uld":
            raise ValueError(
                f"alignment='positions' compares unaligned positions, which only the ULD distance can do; set "
                f"loss_type='uld' (got {self.loss_type!r}) or use alignment='spans'."
            )
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.max_vocab_union_size < 1:
            raise ValueError(f"max_vocab_union_size={self.max_vocab_union_size} must be >= 1.")
        if self.unmatched_vocabulary not in UNMATCHED_VOCABULARY:
            raise ValueError(
                f"unmatched_vocabulary={self.unmatched_vocabulary!r} is not supported; use one of "
                f"{list(UNMATCHED_VOCABULARY)}."
            )
        if self.unmatched_vocabulary == "prefix" and self.matched_loss_type == "reverse_kl":
            raise ValueError(
                "unmatched_vocabulary='prefix' moves the teacher's distribution onto the student's tokens, where "
                "reverse KL is infinite on every token it leaves empty; use loss_type='forward_kl', 'jsd' or 'gold', "
                "or unmatched_vocabulary='bucket'."
            )

    @property
    def matched_loss_type(self) -> str:
        """The loss type handed to :func:`span_aligned_distillation_loss` (`"gold"` means JSD on matched spans)."""
        return "jsd" if self.loss_type == "gold" else self.loss_type


@dataclass
class CrossTokenizerDistillationConfig(CrossTokenizerSettings, DistillationConfig):
    r"""
    Configuration of [`CrossTokenizerDistillationTrainer`]: a [`DistillationConfig`] plus the settings of
    distillation between models with different tokenizers.

    Args:
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"`, `"reverse_kl"` or `"jsd"`: the divergence on matched spans, with ULD on unmatched spans
            (the hybrid loss). `"gold"`: the same with `"jsd"` on matched spans (TRL's GOLD). `"uld"`: ULD on every
            span (Boizard et al., https://huggingface.co/papers/2402.12030).
        matched_weight (`float`, *optional*, defaults to `1.0`):
            Weight (>= 0) of the matched spans' divergence.
        unmatched_weight (`float`, *optional*, defaults to `1.0`):
            Weight (>= 0) of the unmatched spans' ULD distance. Equal weights make every aligned span count once.
        uld_top_k (`int`, *optional*):
            Compare only the `uld_top_k` largest probabilities exactly in ULD (the rest as one mass); faster on
            large vocabularies. `None` (default): exact.
        alignment (`str`, *optional*, defaults to `"spans"`):
            `"spans"` (character-offset alignment, fast tokenizers) or `"positions"` (position i with position i,
            ULD everywhere: the fallback for tokenizers without offset mapping).
        max_length (`int`, *optional*, defaults to `256`):
            Student tokens per row (start token included); the teacher sees the same characters.
        text_column (`str`, *optional*, defaults to `"text"`): the dataset column holding raw text.
        student_start_token (`str`, *optional*, defaults to `"auto"`):
            Token put before each row's student tokens (`"auto"`: BOS, else EOS; empty string: none).
        teacher_start_token (`str`, *optional*, defaults to `"auto"`): the same for the teacher.
        max_vocab_union_size (`int`, *optional*, defaults to `1048576`):
            Refuse vocabulary pairs whose union is larger (memory; see `DEFAULT_MAX_VOCAB_UNION_SIZE`).
        unmatched_vocabulary (`str`, *optional*, defaults to `"bucket"`):
            On matched spans, what the teacher's tokens without a same-string student token count as: `"bucket"`
            (one rest bucket, against the student's own unmatched tokens) or `"prefix"` (each moves its
            probability to the student token of its longest prefix, so the teacher's whole distribution is
            compared with the student's; forward KL and JSD only). `"prefix"` matters when the teacher's
            vocabulary holds many strings the student's lacks: Gemma-3 puts 22% of its mass on such tokens on the
            builtin corpus against GPT-2's vocabulary, SmolLM2 5%.
    """

    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "forward_kl / reverse_kl / jsd on matched spans + ULD on unmatched spans; gold (= jsd hybrid); "
            "uld (ULD everywhere).",
            "choices": list(CROSS_TOKENIZER_LOSS_TYPES),
        },
    )
    allowed_loss_types: ClassVar[tuple[str, ...]] = CROSS_TOKENIZER_LOSS_TYPES
    # a served teacher's top-k is spread into a full distribution (uniform tail) for the span-aligned loss
    served_teacher_needs_sparse_loss: ClassVar[bool] = False

    def _check_distillation_fields(self) -> None:
        if self.loss_type not in CROSS_TOKENIZER_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not available across tokenizers; use one of "
                f"{list(CROSS_TOKENIZER_LOSS_TYPES)}."
            )
        super()._check_distillation_fields()
        self._check_cross_tokenizer_settings()
        unsupported = {
            "teacher_logits_path": self.teacher_logits_path is not None,
            "hidden_loss_weight": self.hidden_loss_weight > 0,
            "lmbda": self.lmbda > 0,
            "seq_kd": self.seq_kd,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by cross-tokenizer distillation (the two "
                    f"models see differently tokenised sequences); leave {name} at its default."
                )

    def distillation_hyperparameters(self) -> dict[str, Any]:
        hyperparameters = super().distillation_hyperparameters()
        hyperparameters.update(
            cross_tokenizer=True,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            alignment=self.alignment,
            max_length=self.max_length,
        )
        if self.loss_type == "gold":
            hyperparameters["jsd_beta"] = self.jsd_beta
        return hyperparameters
