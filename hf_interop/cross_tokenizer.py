"""Moved to `hf_interop.text_alignment`, `hf_interop.losses.cross_tokenizer`, `hf_interop.distill.cross_tokenizer_*`
and `hf_interop.loading`; this path keeps working."""

from .distill.cross_tokenizer_collator import CrossTokenizerDistillationCollator  # noqa: F401
from .distill.cross_tokenizer_config import CROSS_TOKENIZER_LOSS_TYPES, CrossTokenizerDistillationConfig  # noqa: F401
from .distill.cross_tokenizer_trainer import CrossTokenizerDistillationTrainer  # noqa: F401
from .loading import (  # noqa: F401
    GPT2_EOS_TOKEN,
    GPT2_SPLIT_PATTERN,
    GPT2_TOKENIZER_DIRNAME,
    GPT2_VOCAB_SIZE,
    _gpt2_tiktoken_file,
    load_gpt2_tokenizer,
)
from .losses.cross_tokenizer import (  # noqa: F401
    DEFAULT_MATCHED_WEIGHT,
    DEFAULT_UNMATCHED_WEIGHT,
    MATCHED_LOSS_TYPES,
    SPAN_LOSS_TYPES,
    CrossTokenizerDistillationOutput,
    CrossTokenizerLossOutput,
    cross_tokenizer_distillation_loss,
    matched_vocabulary_divergence,
    span_aligned_distillation_loss,
    uld_distance,
    uld_loss,
)
from .text_alignment import (  # noqa: F401
    ALIGNMENT_MODES,
    DEFAULT_MAX_VOCAB_UNION_SIZE,
    AlignedSpan,
    SpanAlignmentIndex,
    TextAlignment,
    VocabularyMapping,
    align_texts,
    align_token_offsets,
    build_span_alignment_index,
    build_vocabulary_mapping,
    check_offsets_support,
    special_token_ids,
    split_texts_into_chunks,
    token_byte_strings,
)
