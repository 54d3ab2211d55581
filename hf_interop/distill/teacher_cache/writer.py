"""Writing a teacher-logits cache: :func:`cache_teacher_logits` and the shards it writes."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...logging_utils import get_logger
from ...utils import atomic_directory, atomic_write_json
from ..served_teacher.capture import connect_served_teacher_for_capture, served_rows
from ..served_teacher.client import is_served_teacher
from .format import (
    _LEGACY_PLAN_VALUES,
    _SHARD_NAME,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARD_DATA_FILE,
    SHARD_INFO_FILE,
    _cache_features,
    _cache_format_version,
    _check_input_ids_column,
    _checked_encoding,
    _compact_schema,
    _model_device,
    _padded_batch,
    _read_json,
    _row_lengths,
    _rows_batch,
    _sha256_file,
    _shard_encoding,
    _teacher_identity,
    _token_columns,
    dataset_fingerprint,
    logprobs_to_float16_round_down,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .reader import TeacherLogitsCache
from .sampling import draw_from_logits, row_uniforms

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

# Flush buffered rows into one Arrow record batch every this many bytes (few batches = little metadata).
_FLUSH_BYTES = 32 * 2**20
# Positions per float32 log-softmax when reducing a row's logits to its top-k (bounds the temporary memory).
_POSITIONS_PER_CHUNK = 256
# Keys of cache_plan.json that a resumed run must reproduce exactly.
_PLAN_KEYS = (
    "format_version",
    "teacher",
    "teacher_revision",
    "teacher_fingerprint",
    "dtype",
    "tokenizer_fingerprint",
    "dataset_fingerprint",
    "top_k",
    "temperature",
    "vocab_size",
    "ids_dtype",
    "num_rows",
    "shard_size",
    "encoding",
    "top_p",
    "logprob_bits",
    "compression",
    "sample_draws",
    "sample_seed",
)


def _teacher_vocab_size(teacher: Any) -> int | None:
    return _vocab_size_of_config(getattr(teacher, "config", None))


def _vocab_size_of_config(config: Any) -> int | None:
    """`config.vocab_size`, else its text config's (multimodal models), else `None`."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None and config is not None and hasattr(config, "get_text_config"):
        vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    return int(vocab_size) if vocab_size is not None else None


def _model_dtype(model: Any) -> str:
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) and isinstance(model, torch.nn.Module):
        dtype = next((p.dtype for p in model.parameters()), None)
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown"


def _classify_output_dir(output_dir: Path) -> str:
    """`"absent"`, `"empty"`, `"cache"` (only our own files) or `"foreign"`."""
    if not output_dir.exists():
        return "absent"
    if not output_dir.is_dir():
        return "foreign"
    entries = list(output_dir.iterdir())
    if not entries:
        return "empty"
    for entry in entries:
        name = entry.name
        if name in (PLAN_FILE, MANIFEST_FILE) and entry.is_file():
            continue
        if _SHARD_NAME.match(name) and entry.is_dir():
            continue
        if name.startswith((".tmp-shard-", f".tmp-{PLAN_FILE}-", f".tmp-{MANIFEST_FILE}-")):
            continue
        return "foreign"
    return "cache"


def _foreign_output_error(output_dir: Path) -> FileExistsError:
    what = "a file" if output_dir.is_file() else "files that are not a teacher-logits cache"
    return FileExistsError(
        f"output_dir {str(output_dir)!r} holds {what}; nothing was changed. Choose an empty or new folder "
        "(overwrite=True (CLI: --overwrite_output_dir) only replaces an earlier teacher-logits cache, never other "
        "files)."
    )


def _plan_differences(existing: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """What differs between the plan of a folder and this run's, one phrase per key.

    A plan written before teacher fingerprints existed has no `teacher_fingerprint` key: that key is not compared
    (the caller warns that those shards cannot be checked).
    """
    differences = []
    for key in _PLAN_KEYS:
        if key == "teacher_fingerprint" and key not in existing:
            continue
        if existing.get(key, _LEGACY_PLAN_VALUES.get(key)) == plan.get(key):
            continue
        difference = f"{key}: {existing.get(key, _LEGACY_PLAN_VALUES.get(key))!r} in the folder, {plan.get(key)!r} now"
        if key == "teacher_fingerprint":
            then, now = existing.get("teacher"), plan.get("teacher")
            who = f"teacher {now!r}" if then == now else f"the teacher ({then!r} then, {now!r} now)"
            difference += (
                f": the weights or config of {who} are not the ones the folder's shards were computed with (a "
                "retrained or re-saved teacher?)"
            )
        differences.append(difference)
    return differences


@contextlib.contextmanager
def _naming_a_full_disk(path: Path, output_dir: Path) -> Iterator[None]:
    """Turn a full disk (`[Errno 28]`, or a full quota) while writing `path` into an error that names it and says how
    to go on. Whatever was being written is already gone (every file of the cache is written atomically)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(
            error.errno,
            f"no space left on device while writing {path} ({error.strerror or error}); nothing half-written was "
            f"kept. Free some space on the disk of {output_dir} and rerun cache_teacher_logits (CLI: hf-interop "
            "cache-teacher) with the same arguments: the finished shards are kept and only the missing ones are "
            "computed.",
        ) from error


def _teacher_topk(
    teacher: Any,
    input_ids: list[list[int]],
    attention_mask: list[list[int]] | None,
    top_k: int,
    temperature: float,
    device: torch.device,
    vocab_size: int,
    ids_dtype: str,
    sampling: tuple[int, int, int] | None = None,
) -> list[tuple[Any, Any]]:
    """Forward one batch; return per row `(ids (L-1, k) numpy in ids_dtype, logprobs (L-1, k) float16 numpy)`, or
    with `sampling = (sample_draws, sample_seed, index of the batch's first row)` the row's draws from the whole
    vocabulary `(ids (L-1, N), counts (L-1, N) int32)` (`sampling.draw_from_logits`)."""
    lengths = [len(row) for row in input_ids]
    ids_tensor, mask_tensor = _padded_batch(input_ids, attention_mask)
    rows = []
    with torch.no_grad():
        logits = teacher(input_ids=ids_tensor.to(device), attention_mask=mask_tensor.to(device)).logits
        if logits.dim() != 3 or logits.shape[:2] != ids_tensor.shape:
            raise ValueError(
                f"the teacher returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                f"{tuple(ids_tensor.shape)}; it must be a causal LM returning (batch, sequence, vocab) `.logits`."
            )
        if logits.shape[-1] != vocab_size:
            raise ValueError(
                f"the teacher returned {logits.shape[-1]} logits per position but its config says vocab_size "
                f"{vocab_size}; fix config.vocab_size so the cache records the right vocabulary."
            )
        for index, length in enumerate(lengths):
            row_ids, row_logprobs = [], []
            if sampling is not None:
                uniforms = row_uniforms(sampling[1], sampling[2] + index, length - 1, sampling[0])
            # float32 log-softmax over a few positions at a time: no (batch, sequence, vocab) float32 copy
            for start in range(0, length - 1, _POSITIONS_PER_CHUNK):
                piece = logits[index, start : min(start + _POSITIONS_PER_CHUNK, length - 1)].float()
                if sampling is not None:
                    ids, counts = draw_from_logits(piece, temperature, uniforms[start : start + piece.shape[0]])
                    row_ids.append(ids.astype(ids_dtype))
                    row_logprobs.append(counts)
                    continue
                values, ids = torch.log_softmax(piece / temperature, dim=-1).topk(top_k, dim=-1)
                row_logprobs.append(logprobs_to_float16_round_down(values).cpu().numpy())
                row_ids.append(ids.cpu().numpy().astype(ids_dtype))
            rows.append((np.concatenate(row_ids), np.concatenate(row_logprobs)))
    return rows


def _write_shard(
    output_dir: Path,
    shard_index: int,
    start: int,
    end: int,
    rows: Iterable[tuple[Any, Any]],
    ids_dtype: str,
    encoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the rows `rows` yields (computed lazily: at most `_FLUSH_BYTES` are held) into shard `shard_index`.

    Each row is `(ids (L-1, k), logprobs (L-1, k) float16 rounded toward -inf)`; a log-prob of `-inf` marks an entry
    the row source does not have (zero mass, never kept by the compact encoding). `encoding` (from
    `_shard_encoding(plan)`) picks the layout; `None` is format version 1 (float16, no compression).
    """
    import pyarrow as pa

    encoding = encoding or dict(_LEGACY_PLAN_VALUES)
    compact = encoding["encoding"] in ("compact", "sampled")
    schema = (
        _compact_schema(encoding["top_k"], encoding["logprob_bits"], encoding["sample_draws"])
        if compact
        else _cache_features(ids_dtype).arrow_schema
    )
    options = pa.ipc.IpcWriteOptions(compression=encoding["compression"])
    name = f"shard-{shard_index:05d}"
    with _naming_a_full_disk(output_dir / name, output_dir), atomic_directory(output_dir / name) as tmp_dir:
        data_path = tmp_dir / SHARD_DATA_FILE
        num_rows = num_predictions = num_entries = 0
        with pa.OSFile(str(data_path), "wb") as sink, pa.ipc.new_stream(sink, schema, options=options) as writer:
            buffered: list[tuple[Any, Any]] = []
            buffered_bytes = 0

            def flush() -> int:
                if compact:
                    from .codec import COUNTS_COLUMN, encode_rows

                    encoded = encode_rows(
                        buffered,
                        encoding["top_p"],
                        encoding["logprob_bits"],
                        encoding["vocab_size"],
                        encoding["top_k"],
                        sample_draws=encoding["sample_draws"],
                        sample_seed=encoding["sample_seed"] or 0,
                        first_row=start + num_rows - len(buffered),  # the index of buffered[0] in the cache
                    )
                    columns = [
                        pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), pa.array(values))
                        for offsets, values in (encoded[field.name] for field in schema)
                    ]
                    writer.write_batch(pa.record_batch(columns, schema=schema))
                    return int(encoded[COUNTS_COLUMN][1].sum(dtype=np.int64))
                offsets = np.zeros(len(buffered) + 1, dtype=np.int64)
                offsets[1:] = np.cumsum([ids.size for ids, _ in buffered])
                flat_ids = np.concatenate([ids.reshape(-1) for ids, _ in buffered]).astype(ids_dtype, copy=False)
                flat_logprobs = np.concatenate([lp.reshape(-1) for _, lp in buffered]).astype(np.float16, copy=False)
                offsets_array = pa.array(offsets, type=pa.int64())
                columns = [
                    pa.LargeListArray.from_arrays(offsets_array, pa.array(flat_ids)),
                    pa.LargeListArray.from_arrays(offsets_array, pa.array(flat_logprobs)),
                ]
                writer.write_batch(pa.record_batch(columns, schema=schema))
                return int(np.isfinite(flat_logprobs).sum())

            for ids, logprobs in rows:
                buffered.append((ids, logprobs))
                buffered_bytes += ids.nbytes + logprobs.nbytes
                num_rows += 1
                num_predictions += ids.shape[0]
                if buffered_bytes >= _FLUSH_BYTES:
                    num_entries += flush()
                    buffered, buffered_bytes = [], 0
            if buffered:
                num_entries += flush()
        if num_rows != end - start:
            raise RuntimeError(f"shard {name} got {num_rows} rows, expected {end - start} (rows {start}..{end - 1}).")
        with open(data_path, "rb") as handle:
            os.fsync(handle.fileno())
        info = {
            "name": name,
            "index": shard_index,
            "start": start,
            "end": end,
            "num_rows": end - start,
            "num_predictions": int(num_predictions),
            "num_bytes": data_path.stat().st_size,
            "sha256": _sha256_file(data_path),
        }
        if compact:
            info["num_entries"] = num_entries  # kept entries (checked against the counts when the cache loads)
        atomic_write_json(tmp_dir / SHARD_INFO_FILE, info)
    return info


def cache_teacher_logits(
    teacher: Any,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    top_k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_size: int = 1024,
    tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_name_or_path: str | None = None,
    teacher_revision: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    dtype: Any = None,
    served_model: str | None = None,
    concurrency: int = 4,
    encoding: str | None = None,
    top_p: float | None = None,
    logprob_bits: int | None = None,
    compression: str | None = None,
    sample_draws: int | None = None,
    sample_seed: int | None = None,
) -> TeacherLogitsCache:
    """Run a teacher once over a tokenized dataset and store its next-token distributions, sparsely.

    For row `r` with `S` tokens, cache row `r` holds `S - 1` positions: position `i` is the teacher's
    distribution after reading `input_ids[: i + 1]`, i.e. its prediction of `input_ids[i + 1]` (the trainer's
    causal shift, `labels[:, 1:]`), at `temperature`, stored by `encoding`: `"sampled"` (the default for an
    in-process teacher) keeps the distinct ids of `sample_draws` draws with their counts, `"compact"` (the default
    for a served teacher) the fewest of the `top_k` largest log-probabilities reaching `top_p`, quantised, and
    `"float16"` all `top_k` as float16 (rounded toward -inf) with uint16 ids (int32 above 65,536 tokens). The tail
    log-mass `log(1 - sum p)` is derived on read (:func:`tail_logprob_from_topk`).

    Writing is robust: rows are cut into shards of `shard_size` rows, each written to a temporary folder and
    renamed into place, so no half shard is ever visible. Calling again with the same arguments after an
    interruption resumes from the shards that exist (none is recomputed or duplicated). Launched with several
    processes (`torchrun`, `accelerate launch`), rank `r` of `W` computes shards `r, r + W, ...`; the main process
    writes `manifest.json` once all shards exist. Any model whose forward returns `.logits` works as teacher,
    including `EnsembleForCausalLM` (whose `logits` are the ensemble's log-probabilities).

    Args:
        teacher (`PreTrainedModel`, `torch.nn.Module`, `str` or `ServedTeacher`):
            The teacher, or a hub id / local folder / .gguf file loaded with :func:`hf_interop.load_causal_lm`
            (its tokenizer is then loaded too and fingerprinted), or a served teacher: the URL of an
            OpenAI-compatible server (`"http://127.0.0.1:8000/v1"`: vLLM, llama.cpp's server, llama-cpp-python)
            or a :class:`hf_interop.ServedTeacher`. A served teacher needs `tokenizer` (the student's); it is
            checked before anything is written, and `concurrency` rows are asked at once.
        dataset (`datasets.Dataset`):
            Tokenized rows with `input_ids` and optionally `attention_mask` (e.g. from
            :func:`hf_interop.pack_dataset`). Other columns (`labels`, ...) are ignored.
        output_dir (`str` or `os.PathLike`):
            Folder of the cache. Must be new, empty, or an earlier cache of the same job (resumed).
        top_k (`int`, *optional*, defaults to 64):
            Log-probabilities kept per position. Higher covers more teacher mass and costs `4 * top_k` bytes per
            position. `encoding="sampled"` uses it with a served teacher only (the entries asked for).
        temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature of the stored distribution (`log_softmax(logits / temperature)`); the trainer
            re-tempers when training at another temperature.
        batch_size (`int`, *optional*, defaults to 8):
            Rows per teacher forward pass.
        shard_size (`int`, *optional*, defaults to 1024):
            Rows per shard (the unit of atomic writing, resuming and multi-process splitting).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer of `dataset`, fingerprinted into the manifest so a trainer can refuse a mismatched cache.
            Loaded with the teacher when `teacher` is a name.
        teacher_name_or_path (`str`, *optional*):
            Name recorded for the teacher; defaults to `teacher` when it is a name, else the model's `name_or_path`.
        teacher_revision (`str`, *optional*):
            Revision of a hub teacher (used for loading and recorded).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an earlier teacher-logits cache in `output_dir` (a complete one, or a partial one of a
            different job). A folder holding anything else is always refused and left untouched.
        show_progress (`bool`, *optional*, defaults to `True`):
            tqdm progress bar (main process only).
        dtype (`str` or `torch.dtype`, *optional*):
            dtype to load a teacher given by name in (e.g. `"float32"`, `"bfloat16"`).
        served_model (`str`, *optional*):
            For a teacher URL: the served model's name (defaults to the one the server lists).
        concurrency (`int`, *optional*, defaults to 4):
            For a teacher URL: requests in flight at once.
        encoding (`str`, *optional*):
            Defaults to `"sampled"` for an in-process teacher and `"compact"` for a served one (its server returns
            the top-k only; `default_encoding`). Measured on SmolLM2-135M (`benchmarks/results/teacher_cache_sampled.md`):
            `"sampled"` with 64 draws stores 50 bytes per token (0.20x `"float16"` at k=64) and trained students 3%
            better than `"float16"` k=64 did; it serves forward KL at the cache's temperature only (the trainer
            refuses other losses), where `"compact"` and `"float16"` serve every sparse loss at any temperature.
            `"compact"` (format version 2, see `teacher_cache.codec`): per position the fewest of the top-k entries
            whose probability reaches `top_p` (0.98 by default), their ids Elias-Fano coded (about 11 bits each for
            SmolLM2's 49,152 tokens), their log-probs as `logprob_bits`-bit codes under a per-position scale,
            rounded so that no stored probability exceeds the teacher's. `"sampled"` (format version 3): per
            position `sample_draws` tokens drawn from the teacher's whole vocabulary (a served teacher: from its
            `top_k` entries, the mass outside them being one more outcome), the distinct drawn ids Elias-Fano coded
            and how often each was drawn; the stored probabilities (count / draws) are an unbiased estimate of the
            teacher's, so the forward-KL gradient is too (Sparse Logit Sampling,
            https://huggingface.co/papers/2503.16870). At 64 draws about 20 ids per position for SmolLM2 on the
            builtin corpus (`benchmarks/results/teacher_cache_sampled.md`). `"float16"`: format version 1 (`4 * top_k`
            bytes per position), as hf_interop wrote before encodings existed.
        top_p (`float`, *optional*):
            `"compact"` only: the probability mass a position's kept entries must reach (at most `top_k` entries
            are kept); in (0, 1]. Defaults to 0.98 (with the default `top_k=64` and 6-bit codes, 0.47x the float16
            cache's bytes for SmolLM2 at the same student perplexity; 1.0 keeps all `top_k`; `top_k=32, top_p=0.98`
            stores about 75 bytes per token at 1.7% of perplexity: `benchmarks/results/teacher_cache_frontier.md`).
        logprob_bits (`int`, *optional*):
            `"compact"` only: 6 (the default; error below the position's step `(top - smallest kept) / 62`), 8
            (step `/ 254`), 4 (16 levels, coarse) or 16 (the float16 values themselves). `"float16"` stores 16.
        compression (`str`, *optional*):
            Arrow IPC buffer compression of the shards: `"zstd"`, `"lz4"` or `None` (default). A compressed cache
            is decompressed into memory when it loads instead of being memory-mapped.
        sample_draws (`int`, *optional*):
            `"sampled"` only: tokens drawn per position, 1 to 4,096 (default 64); a count takes
            `bit_length(sample_draws - 1)` bits. More draws: a closer estimate and more distinct ids stored.
        sample_seed (`int`, *optional*):
            `"sampled"` only: seed of the draws (default 0). Row `r` draws from `numpy.random.default_rng((sample_seed,
            r))`, so a resumed or multi-process capture writes the same bytes as a single uninterrupted one.

    Returns:
        :class:`TeacherLogitsCache`: the finished cache, loaded memory-mapped (on every process).
    """
    from accelerate import PartialState

    output_dir, state_of_dir, vocab_size, lengths = _check_arguments(
        teacher, dataset, output_dir, top_k, temperature, batch_size, shard_size, teacher_revision
    )
    encoding_plan = _checked_encoding(
        encoding, top_p, logprob_bits, compression, sample_draws, sample_seed, served=is_served_teacher(teacher)
    )

    # ---- load the teacher (the first expensive step) ----
    # Without a GPU, Accelerate only sees the ranks of a `torchrun` launch when asked for CPU processes (gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
    if is_served_teacher(teacher):
        teacher, teacher_id, teacher_revision = connect_served_teacher_for_capture(
            teacher, tokenizer, top_k, served_model, concurrency, teacher_name_or_path, teacher_revision
        )
    else:
        teacher, tokenizer, teacher_id, teacher_revision = _load_teacher(
            teacher, state, tokenizer, teacher_name_or_path, teacher_revision, dtype
        )
    vocab_size = _checked_vocab_size(teacher, vocab_size, top_k, teacher_id)
    if tokenizer is None:
        logger.warning(
            "cache_teacher_logits got no tokenizer: the manifest will have no tokenizer fingerprint, so a trainer "
            "cannot check that the cache matches its tokenizer. Pass tokenizer=... to record it."
        )
    plan = _cache_plan(
        teacher, teacher_id, teacher_revision, tokenizer, dataset, lengths, top_k, temperature, vocab_size, shard_size
    )
    plan.update(encoding_plan)

    # ---- decide what to do with the folder (same decision on every process; only the main one writes) ----
    folder = _folder_decision(output_dir, state_of_dir, plan, overwrite)
    if folder == "complete":
        logger.info(f"{output_dir} already holds this complete cache; nothing to do (overwrite=True recomputes it).")
        state.wait_for_everyone()
        return TeacherLogitsCache.load(output_dir)
    _prepare_folder(output_dir, plan, folder == "fresh", state)

    # ---- compute this process's missing shards ----
    _compute_missing_shards(teacher, dataset, output_dir, plan, state, top_k, temperature, batch_size, show_progress)

    # ---- the main process writes the manifest once every shard exists ----
    state.wait_for_everyone()
    if state.is_main_process:
        _write_manifest(output_dir, plan, state.num_processes)
    state.wait_for_everyone()
    return TeacherLogitsCache.load(output_dir)


def _check_arguments(
    teacher: Any,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    top_k: int,
    temperature: float,
    batch_size: int,
    shard_size: int,
    teacher_revision: str | None,
) -> tuple[Path, str, int | None, list[int]]:
    """Cheap checks, identical on every process, before anything is loaded or written.

    Returns the output folder as a `Path`, what it holds (see `_classify_output_dir`), the teacher's vocabulary size
    when its config tells it without loading weights, and the dataset's row lengths.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}; 64 is a good default (256 bytes/position).")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; use 1.0 to store the teacher's own "
            "distribution."
        )
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    _check_input_ids_column(dataset)
    if len(dataset) == 0:
        raise ValueError(
            "dataset is empty; there is nothing to cache. Pack some text first (hf_interop.pack_dataset)."
        )
    output_dir = Path(output_dir)
    state_of_dir = _classify_output_dir(output_dir)
    if state_of_dir == "foreign":
        raise _foreign_output_error(output_dir)

    vocab_size = _teacher_vocab_size(teacher) if not isinstance(teacher, (str, os.PathLike)) else None
    if is_served_teacher(teacher):
        vocab_size = None  # known once the tokenizer is checked against the server
    elif isinstance(teacher, (str, os.PathLike)) and not str(teacher).endswith(".gguf"):
        vocab_size = _config_vocab_size(str(teacher), teacher_revision)
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k={top_k} is larger than the teacher's vocabulary ({vocab_size}); use top_k <= {vocab_size} "
            "(64 is usually plenty)."
        )

    lengths = _row_lengths(dataset)
    if min(lengths) < 2:
        short = lengths.index(min(lengths))
        raise ValueError(
            f"dataset row {short} has {lengths[short]} token(s); every row needs at least 2 (an input and a "
            "target). Drop short rows or pack the text with hf_interop.pack_dataset."
        )
    return output_dir, state_of_dir, vocab_size, lengths


def _load_teacher(
    teacher: Any,
    state: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    teacher_name_or_path: str | None,
    teacher_revision: str | None,
    dtype: Any,
) -> tuple[Any, PreTrainedTokenizerBase | None, str, str | None]:
    """The teacher (loaded on this process's device when given by name), its tokenizer, name and revision."""
    if isinstance(teacher, (str, os.PathLike)):
        from ...loading import load_causal_lm

        device_map = {"": state.device} if state.device.type != "cpu" else None
        teacher_id = _teacher_identity(teacher, teacher_name_or_path)
        teacher, loaded_tokenizer = load_causal_lm(
            str(teacher), revision=teacher_revision, dtype=dtype, device_map=device_map
        )
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if teacher_revision is None:
            teacher_revision = getattr(teacher.config, "_commit_hash", None)
    else:
        teacher_id = _teacher_identity(teacher, teacher_name_or_path)
        if teacher_revision is None:
            teacher_revision = getattr(getattr(teacher, "config", None), "_commit_hash", None)
    return teacher, tokenizer, teacher_id, teacher_revision


def _checked_vocab_size(teacher: Any, vocab_size: int | None, top_k: int, teacher_id: str) -> int:
    """The loaded teacher's vocabulary size (else the one read from its config), checked against `top_k`."""
    loaded = getattr(teacher, "vocab_size", None) if is_served_teacher(teacher) else _teacher_vocab_size(teacher)
    vocab_size = loaded or vocab_size
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k={top_k} is larger than the teacher's vocabulary ({vocab_size}); use top_k <= {vocab_size}."
        )
    if vocab_size is None:
        raise ValueError(
            f"cannot tell the vocabulary size of teacher {teacher_id!r}: it has no config.vocab_size. Give it a "
            "`config` with `vocab_size` (any object)."
        )
    return vocab_size


def _cache_plan(
    teacher: Any,
    teacher_id: str,
    teacher_revision: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    dataset: Dataset,
    lengths: list[int],
    top_k: int,
    temperature: float,
    vocab_size: int,
    shard_size: int,
) -> dict[str, Any]:
    """What is being computed: the content of cache_plan.json (a resumed run must reproduce its `_PLAN_KEYS`)."""
    return {
        "format_version": _cache_format_version("float16"),  # cache_teacher_logits sets the encoding's
        "teacher": teacher_id,
        "teacher_revision": teacher_revision,
        "teacher_class": type(teacher).__name__,
        # config and sampled weights: a retrained teacher saved to the same folder is another teacher; a served one
        # is named by the model and revision its server reports
        "teacher_fingerprint": teacher.fingerprint() if is_served_teacher(teacher) else teacher_fingerprint(teacher),
        "dtype": "served" if is_served_teacher(teacher) else _model_dtype(teacher),
        **({"served_teacher": dict(teacher.model_info)} if is_served_teacher(teacher) else {}),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "top_k": top_k,
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "ids_dtype": "uint16" if vocab_size <= 65536 else "int32",
        "logprobs_dtype": "float16",
        "logprobs_rounding": "toward -inf",
        "tail": "derived on read: log(1 - sum(exp(stored float16 logprobs)))",
        "num_rows": len(dataset),
        "seq_length": lengths[0] if len(set(lengths)) == 1 else None,
        "max_seq_length": max(lengths),
        "num_predictions": sum(lengths) - len(lengths),
        "shard_size": shard_size,
        "num_shards": math.ceil(len(dataset) / shard_size),
    }


def _folder_decision(output_dir: Path, state_of_dir: str, plan: dict[str, Any], overwrite: bool) -> str:
    """`"fresh"` (start over), `"resume"` (an unfinished cache of this job) or `"complete"` (nothing to do).

    The same decision on every process; raises when the folder holds a cache that may not be replaced.
    """
    plan_path, manifest_path = output_dir / PLAN_FILE, output_dir / MANIFEST_FILE
    start_fresh = state_of_dir in ("absent", "empty")
    if state_of_dir == "cache":
        existing = _read_json(plan_path) if plan_path.is_file() else None
        differences = _plan_differences(existing, plan) if existing is not None else []
        has_shards = any(_SHARD_NAME.match(entry.name) for entry in output_dir.iterdir())
        if existing is None and has_shards:
            if not overwrite:
                raise FileExistsError(
                    f"output_dir {str(output_dir)!r} has cache shards but no {PLAN_FILE}, so they cannot be checked; "
                    "pass overwrite=True (CLI: --overwrite_output_dir) to replace them, or choose another folder."
                )
            start_fresh = True
        elif existing is None:
            start_fresh = True
        elif overwrite:
            start_fresh = True
        elif differences:
            raise ValueError(
                f"output_dir {str(output_dir)!r} holds a teacher-logits cache of a different job ("
                + "; ".join(differences)
                + "). Pass overwrite=True (CLI: --overwrite_output_dir) to replace it, or choose another folder."
            )
        elif manifest_path.is_file() and _all_shards_present(output_dir, plan):
            return "complete"
        if existing is not None and "teacher_fingerprint" not in existing and not start_fresh:
            logger.warning(
                f"{output_dir} was started by an older hf_interop that recorded no teacher fingerprint: its finished "
                "shards cannot be checked against this teacher, and the finished cache will record none. Pass "
                "overwrite=True (CLI: --overwrite_output_dir) to recompute it with a fingerprint."
            )
            plan["teacher_fingerprint"] = None
    return "fresh" if start_fresh else "resume"


def _prepare_folder(output_dir: Path, plan: dict[str, Any], start_fresh: bool, state: Any) -> None:
    """The main process empties the folder (`start_fresh`) or removes a killed run's leftovers, and writes the plan."""
    plan_path = output_dir / PLAN_FILE
    state.wait_for_everyone()
    if state.is_main_process:
        if start_fresh and output_dir.exists():
            _remove_cache_folder_contents(output_dir)
        else:
            for entry in output_dir.glob(".tmp-*") if output_dir.exists() else []:
                # leftovers of a killed run (no process of this job is writing yet)
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            # a manifest that lists a shard someone deleted (to recompute it) no longer describes the folder
            (output_dir / MANIFEST_FILE).unlink(missing_ok=True)
        if start_fresh or not plan_path.is_file():
            with _naming_a_full_disk(plan_path, output_dir):
                output_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(plan_path, plan)
    state.wait_for_everyone()


def _compute_missing_shards(
    teacher: Any,
    dataset: Dataset,
    output_dir: Path,
    plan: dict[str, Any],
    state: Any,
    top_k: int,
    temperature: float,
    batch_size: int,
    show_progress: bool,
) -> None:
    """Compute and write the shards of this process (rank `r` of `W`: shards `r, r + W, ...`) not on disk yet."""
    from tqdm.auto import tqdm

    num_shards, shard_size, vocab_size = plan["num_shards"], plan["shard_size"], plan["vocab_size"]
    todo = [
        shard
        for shard in range(state.process_index, num_shards, state.num_processes)
        if not (output_dir / f"shard-{shard:05d}").is_dir()
    ]
    done_elsewhere = num_shards - len(todo)
    if done_elsewhere and todo:
        logger.info(f"Resuming {output_dir}: {len(todo)} shard(s) left for this process.", main_process_only=False)
    served = is_served_teacher(teacher)
    device = None if served else _model_device(teacher)
    was_training = getattr(teacher, "training", False)
    if hasattr(teacher, "eval"):
        teacher.eval()
    ids_dtype = plan["ids_dtype"]
    total_batches = sum(
        math.ceil((min((s + 1) * shard_size, len(dataset)) - s * shard_size) / batch_size) for s in todo
    )
    progress = tqdm(
        total=sum(min((s + 1) * shard_size, len(dataset)) - s * shard_size for s in todo) if served else total_batches,
        desc=f"Caching {'served ' if served else ''}teacher top-{top_k}",
        unit="row" if served else "it",
        disable=not show_progress or not state.is_main_process,
    )
    reading = dataset.select_columns(_token_columns(dataset))
    sampling = (plan["sample_draws"], plan["sample_seed"]) if plan.get("encoding") == "sampled" else None
    try:
        for shard in todo:
            start, end = shard * shard_size, min((shard + 1) * shard_size, len(dataset))

            def shard_rows(start: int = start, end: int = end) -> Iterator[tuple[Any, Any]]:
                if served:
                    yield from served_rows(teacher, reading, start, end, progress)
                    return
                for batch_start in range(start, end, batch_size):
                    input_ids, attention_mask = _rows_batch(reading, batch_start, min(batch_start + batch_size, end))
                    yield from _teacher_topk(
                        teacher, input_ids, attention_mask, top_k, temperature, device, vocab_size, ids_dtype,
                        None if sampling is None else (*sampling, batch_start),
                    )  # fmt: skip
                    progress.update(1)

            _write_shard(output_dir, shard, start, end, shard_rows(), ids_dtype, _shard_encoding(plan))
    finally:
        progress.close()
        if was_training and hasattr(teacher, "train"):
            teacher.train()


def _write_manifest(output_dir: Path, plan: dict[str, Any], num_processes: int) -> None:
    """manifest.json (the plan, every shard's info, sizes), written by the main process once every shard exists."""
    num_shards = plan["num_shards"]
    shards = []
    for shard in range(num_shards):
        info_path = output_dir / f"shard-{shard:05d}" / SHARD_INFO_FILE
        if not info_path.is_file():
            raise RuntimeError(
                f"shard-{shard:05d} of {output_dir} is missing after every process finished; rerun "
                "cache_teacher_logits with the same arguments to compute it."
            )
        shards.append(_read_json(info_path))
    manifest = {
        **plan,
        "shards": shards,
        "num_bytes": sum(shard["num_bytes"] for shard in shards),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_processes": num_processes,
    }
    with _naming_a_full_disk(output_dir / MANIFEST_FILE, output_dir):
        atomic_write_json(output_dir / MANIFEST_FILE, manifest)
    logger.info(
        f"Cached teacher top-{plan['top_k']} log-probs for {plan['num_rows']} rows in {output_dir} "
        f"({manifest['num_bytes'] / max(1, plan['num_predictions']):.1f} bytes per position)."
    )


def _all_shards_present(output_dir: Path, plan: dict[str, Any]) -> bool:
    """Whether every shard folder exists: a user who deleted a corrupt one (as the reader's error says) resumes."""
    return all((output_dir / f"shard-{shard:05d}").is_dir() for shard in range(plan["num_shards"]))


def _config_vocab_size(name_or_path: str, revision: str | None) -> int | None:
    """vocab_size from config.json without loading weights (None when it cannot be read cheaply)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except Exception:  # load_causal_lm will raise the clear error
        return None
    return _vocab_size_of_config(config)


def _remove_cache_folder_contents(output_dir: Path) -> None:
    """Delete an earlier cache's own files (only called after `_classify_output_dir` said "cache")."""
    for entry in output_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
