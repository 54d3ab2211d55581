"""Offline teacher logits: run a teacher once over a tokenized dataset, distil many students from the result.

:func:`cache_teacher_logits` stores, for every position `0..S-2` of every row (position `i` predicts
`input_ids[i + 1]`, the trainer's causal shift), the teacher's top-k log-probabilities (float16) and token ids
(uint16 when the vocabulary fits, else int32). :class:`TeacherLogitsCache` reads it back memory-mapped and feeds
`DistillationTrainer` (`DistillationConfig.teacher_logits_path`) through `attach` and `collate`.

Layout of a cache folder:

```
output_dir/
  cache_plan.json        what is being computed (written first; a resumed run must match it, teacher fingerprint
                         included: a retrained teacher does not resume another's cache)
  shard-00000/           one folder per `shard_size` rows, renamed into place only when complete
    data.arrow           Arrow IPC stream: `teacher_topk_ids`, `teacher_topk_logprobs` (one flat list per row)
    shard.json           row range, byte size and sha256 of data.arrow (checked by every `load`)
  ...
  manifest.json          written last, by the main process, once every shard exists
```

Encodings. `encoding="sampled"` (format version 3, the default for an in-process teacher, `sampling.py` and
`codec.py`): per position the distinct ids of `sample_draws` (64) draws from the teacher's whole distribution,
Elias-Fano coded, with their counts; an unbiased estimate for forward KL at the cache's temperature (about 50 bytes
per token for SmolLM2, `benchmarks/results/teacher_cache_sampled.md`). `encoding="compact"` (format version 2, the
default for a served teacher, `codec.py`): per position the fewest of the top-k entries reaching `top_p` of the mass
(0.98 by default), ids Elias-Fano coded, log-probs as 6-bit (or 8/4-bit) codes under a per-position scale, rounded
down; 0.47x of the float16 size by default (`benchmarks/bench_teacher_cache_encodings.py`). Both are decoded in
`collate`. `encoding="float16"` (format version 1) is described below; all three load, any other version is
refused. `manifest.json` and `cache_plan.json` record `format_version`, `encoding`, `top_p`, `logprob_bits`,
`compression` (and `sample_draws`, `sample_seed`).

Size (format version 1). Each row stores two flat lists of `(S - 1) * top_k` values (one list offset per row, none per token), so
the payload is `4 * top_k` bytes per prediction (256 at k=64) and Arrow adds a few bytes per row. The tail
log-mass `log(1 - sum(top-k p))` is NOT stored: it is derived on read from the stored float16 log-probs (see
:func:`tail_logprob_from_topk`). To keep that derivation well defined, log-probs are rounded toward -inf when
converted to float16, so the stored top-k probabilities never sum to more than the teacher's true top-k mass
(and never to more than 1); the derived tail is the exact complement of what is stored.
"""

from .format import (
    CACHE_FORMAT_VERSION,
    IDS_COLUMN,
    LOGPROBS_COLUMN,
    MANIFEST_FILE,
    PAD_LOGPROB,
    PLAN_FILE,
    SHARD_DATA_FILE,
    SHARD_INFO_FILE,
    TAIL_COLUMN,
    dataset_fingerprint,
    logprobs_to_float16_round_down,
    tail_logprob_from_topk,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .reader import TeacherLogitsCache, sparse_kl
from .writer import cache_teacher_logits

__all__ = [
    "CACHE_FORMAT_VERSION",
    "IDS_COLUMN",
    "LOGPROBS_COLUMN",
    "MANIFEST_FILE",
    "PAD_LOGPROB",
    "PLAN_FILE",
    "SHARD_DATA_FILE",
    "SHARD_INFO_FILE",
    "TAIL_COLUMN",
    "TeacherLogitsCache",
    "cache_teacher_logits",
    "dataset_fingerprint",
    "logprobs_to_float16_round_down",
    "sparse_kl",
    "tail_logprob_from_topk",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
]
