"""Moved to `hf_interop.distill.teacher_cache`; this path keeps working."""

from .distill.teacher_cache import (  # noqa: F401
    CACHE_FORMAT_VERSION,
    IDS_COLUMN,
    LOGPROBS_COLUMN,
    MANIFEST_FILE,
    PAD_LOGPROB,
    PLAN_FILE,
    SHARD_DATA_FILE,
    SHARD_INFO_FILE,
    TAIL_COLUMN,
    TeacherLogitsCache,
    cache_teacher_logits,
    dataset_fingerprint,
    logprobs_to_float16_round_down,
    sparse_kl,
    tail_logprob_from_topk,
    tokenizer_fingerprint,
)
