"""Offline teacher logits: run a teacher once over a tokenized dataset, distil many students from the result.

:func:`cache_teacher_logits` stores, for every position `0..S-2` of every row (position `i` predicts
`input_ids[i + 1]`, the trainer's causal shift), the teacher's top-k log-probabilities (float16) and token ids
(uint16 when the vocabulary fits, else int32). :class:`TeacherLogitsCache` reads it back memory-mapped and feeds
`DistillationTrainer` (`DistillationConfig.teacher_logits_path`) through `attach` and `collate`.

Layout of a cache folder:

```
output_dir/
  cache_plan.json        what is being computed (written first; a resumed run must match it)
  shard-00000/           one folder per `shard_size` rows, renamed into place only when complete
    data.arrow           Arrow IPC stream: `teacher_topk_ids`, `teacher_topk_logprobs` (one flat list per row)
    shard.json           row range, byte size and sha256 of data.arrow
  ...
  manifest.json          written last, by the main process, once every shard exists
```

Size. Each row stores two flat lists of `(S - 1) * top_k` values (one list offset per row, none per token), so
the payload is `4 * top_k` bytes per prediction (256 at k=64) and Arrow adds a few bytes per row. The tail
log-mass `log(1 - sum(top-k p))` is NOT stored: it is derived on read from the stored float16 log-probs (see
:func:`tail_logprob_from_topk`). To keep that derivation well defined, log-probs are rounded toward -inf when
converted to float16, so the stored top-k probabilities never sum to more than the teacher's true top-k mass
(and never to more than 1); the derived tail is the exact complement of what is stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...logging_utils import get_logger
from ...utils import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

CACHE_FORMAT_VERSION = 1
IDS_COLUMN = "teacher_topk_ids"
LOGPROBS_COLUMN = "teacher_topk_logprobs"
TAIL_COLUMN = "teacher_tail_logprob"
PLAN_FILE = "cache_plan.json"
MANIFEST_FILE = "manifest.json"
SHARD_DATA_FILE = "data.arrow"
SHARD_INFO_FILE = "shard.json"
_SHARD_NAME = re.compile(r"^shard-(\d{5,})$")
# Log-prob written into padded positions by `collate`: finite (no NaN in any loss), zero probability in float32,
# so the derived tail of a padded position holds all the mass. Padded positions have label -100 anyway.
PAD_LOGPROB = -1.0e4
# Flush buffered rows into one Arrow record batch every this many bytes (few batches = little metadata).
_FLUSH_BYTES = 32 * 2**20
# Positions per float32 log-softmax when reducing a row's logits to its top-k (bounds the temporary memory).
_POSITIONS_PER_CHUNK = 256
# Keys of cache_plan.json that a resumed run must reproduce exactly.
_PLAN_KEYS = (
    "format_version",
    "teacher",
    "teacher_revision",
    "tokenizer_fingerprint",
    "dataset_fingerprint",
    "top_k",
    "temperature",
    "vocab_size",
    "ids_dtype",
    "num_rows",
    "shard_size",
)


# --------------------------------------------------------------------------------------------------------------
# Fingerprints (content hashes, stable across runs and machines)
# --------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Content hash of a tokenizer: vocabulary, merges, added tokens, normalizer and pre/post-processing.

    Padding/truncation settings are left out (they change when the tokenizer is called, not what ids mean), and so
    is the special-tokens map (`load_tokenizer` sets `pad_token = eos_token` without changing any id).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a fast or slow tokenizer.

    Returns:
        `str`: `"sha256:<hex>"`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    state["__len__"] = len(tokenizer)
    payload = json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """Content hash of a tokenized dataset's rows, in order: `input_ids` and any `attention_mask` with zeros.

    `datasets`' own fingerprints are random for in-memory datasets, so they cannot tell whether a cache belongs to
    a dataset in a later run. This hashes the token ids themselves (as int64, so int32 and int64 storage agree)
    and the row lengths; an `attention_mask` that is all ones is the same as none (the teacher saw the same
    thing). Labels are not part of it: the cache does not depend on them.

    Args:
        dataset (`datasets.Dataset`): rows with an `input_ids` column.

    Returns:
        `str`: `"sha256:<hex>"`.
    """
    import numpy as np
    import pyarrow.compute as pc

    _check_input_ids_column(dataset)
    columns = ["input_ids"] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])
    view = dataset.select_columns(columns).with_format("arrow")
    lengths_hash, ids_hash, mask_hash = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    chunk = 4096
    for start in range(0, len(dataset), chunk):
        table = view[start : start + chunk]
        ids = table.column("input_ids").combine_chunks()
        lengths_hash.update(pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        ids_hash.update(pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        if "attention_mask" in columns:
            masks = table.column("attention_mask").combine_chunks()
            values = pc.list_flatten(masks).to_numpy(zero_copy_only=False).astype("<i8")
            if values.size and values.min() == 0:
                offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(masks).to_numpy(zero_copy_only=False))])
                for offset in range(len(masks)):
                    mask = values[offsets[offset] : offsets[offset + 1]]
                    if mask.size and mask.min() == 0:
                        mask_hash.update(np.asarray([start + offset], dtype="<i8").tobytes() + mask.tobytes())
    combined = hashlib.sha256(b"hf_interop-dataset-v1")
    for part in (lengths_hash, ids_hash, mask_hash):
        combined.update(part.digest())
    return "sha256:" + combined.hexdigest()


def _check_input_ids_column(dataset: Any) -> None:
    column_names = getattr(dataset, "column_names", None)
    if column_names is None:
        raise TypeError(
            f"dataset must be a datasets.Dataset of tokenized rows, got {type(dataset).__name__}; build one with "
            "hf_interop.pack_dataset(...) or datasets.Dataset.from_dict({'input_ids': ...})."
        )
    if "input_ids" not in column_names:
        raise ValueError(
            f"dataset has no 'input_ids' column (columns: {column_names}); tokenize it first, e.g. with "
            "hf_interop.pack_dataset(dataset, tokenizer)."
        )


# --------------------------------------------------------------------------------------------------------------
# float16 storage and the derived tail
# --------------------------------------------------------------------------------------------------------------


def logprobs_to_float16_round_down(logprobs: torch.Tensor) -> torch.Tensor:
    """Convert log-probabilities (<= 0) to float16, rounding toward -inf.

    Rounding down keeps `sum(exp(stored))` <= the true top-k mass <= 1, so the tail derived from the stored values
    (:func:`tail_logprob_from_topk`) is never negative mass. The error is at most one float16 step (relative 2**-10).
    """
    import torch

    values = logprobs.float().clamp(max=0.0)
    half = values.to(torch.float16)
    rounded_up = half.float() > values
    # Every value here is <= 0, so its float16 bit pattern has the sign bit set (-0.0 included); one step toward
    # -inf adds one to the magnitude, i.e. +1 on the raw 16 bits.
    bits = half.view(torch.int16)
    bits = torch.where(rounded_up, bits + 1, bits)
    return bits.view(torch.float16)


def tail_logprob_from_topk(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Tail log-mass `log(1 - sum(exp(topk_logprobs)))` over the last dimension, in float32.

    Computed in float64 (a tail of 1e-6 next to a top-k mass of 0.999999 survives), and floored at the smallest
    normal float32 so a top-k that covers all stored mass gives a large negative, finite tail rather than -inf.

    Args:
        topk_logprobs (`torch.Tensor`): `(..., k)` log-probabilities, e.g. a cache's stored float16 values.

    Returns:
        `torch.Tensor`: `(...)` float32.
    """
    import torch

    mass = topk_logprobs.double().exp().sum(-1)
    tail_mass = (1.0 - mass).clamp(min=torch.finfo(torch.float32).tiny)
    return tail_mass.log().float()


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _cache_features(ids_dtype: str):
    from datasets import Features, LargeList, Value

    return Features({IDS_COLUMN: LargeList(Value(ids_dtype)), LOGPROBS_COLUMN: LargeList(Value("float16"))})


def _teacher_vocab_size(teacher: Any) -> int | None:
    config = getattr(teacher, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None and config is not None and hasattr(config, "get_text_config"):
        vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    return int(vocab_size) if vocab_size is not None else None


def _teacher_identity(teacher: Any, teacher_name_or_path: str | None) -> str:
    if teacher_name_or_path is not None:
        return str(teacher_name_or_path)
    if isinstance(teacher, (str, os.PathLike)):
        return str(teacher)
    for candidate in (
        getattr(teacher, "name_or_path", None),
        getattr(getattr(teacher, "config", None), "_name_or_path", None),
    ):
        if candidate:
            return str(candidate)
    return type(teacher).__name__


def _model_device(model: Any) -> torch.device:
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.device.type != "meta":
                return parameter.device
    return torch.device("cpu")


def _model_dtype(model: Any) -> str:
    import torch

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
        "(overwrite=True only replaces an earlier teacher-logits cache, never other files)."
    )


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _plan_differences(existing: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {existing.get(key)!r} in the folder, {plan.get(key)!r} now"
        for key in _PLAN_KEYS
        if existing.get(key) != plan.get(key)
    ]


def _rows_batch(dataset: Dataset, start: int, end: int) -> tuple[list[list[int]], list[list[int]] | None]:
    rows = dataset[start:end]
    input_ids = [list(map(int, row)) for row in rows["input_ids"]]
    attention_mask = None
    if "attention_mask" in rows:
        attention_mask = [list(map(int, row)) for row in rows["attention_mask"]]
    return input_ids, attention_mask


def _teacher_topk(
    teacher: Any,
    input_ids: list[list[int]],
    attention_mask: list[list[int]] | None,
    top_k: int,
    temperature: float,
    device: torch.device,
    vocab_size: int,
    ids_dtype: str,
) -> list[tuple[Any, Any]]:
    """Forward one batch; return per row `(ids (L-1, k) numpy in ids_dtype, logprobs (L-1, k) float16 numpy)`."""
    import numpy as np
    import torch

    lengths = [len(row) for row in input_ids]
    width = max(lengths)
    ids_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    mask_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    for index, row in enumerate(input_ids):
        ids_tensor[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        if attention_mask is not None:
            mask_tensor[index, : len(row)] = torch.tensor(attention_mask[index], dtype=torch.long)
        else:
            mask_tensor[index, : len(row)] = 1
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
            # float32 log-softmax over a few positions at a time: no (batch, sequence, vocab) float32 copy
            for start in range(0, length - 1, _POSITIONS_PER_CHUNK):
                piece = logits[index, start : min(start + _POSITIONS_PER_CHUNK, length - 1)].float()
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
) -> dict[str, Any]:
    """Write the rows `rows` yields (computed lazily: at most `_FLUSH_BYTES` are held) into shard `shard_index`."""
    import numpy as np
    import pyarrow as pa

    features = _cache_features(ids_dtype)
    schema = features.arrow_schema
    name = f"shard-{shard_index:05d}"
    with atomic_directory(output_dir / name) as tmp_dir:
        data_path = tmp_dir / SHARD_DATA_FILE
        num_rows = num_predictions = 0
        with pa.OSFile(str(data_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            buffered: list[tuple[Any, Any]] = []
            buffered_bytes = 0

            def flush() -> None:
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

            for ids, logprobs in rows:
                buffered.append((ids, logprobs))
                buffered_bytes += ids.nbytes + logprobs.nbytes
                num_rows += 1
                num_predictions += ids.shape[0]
                if buffered_bytes >= _FLUSH_BYTES:
                    flush()
                    buffered, buffered_bytes = [], 0
            if buffered:
                flush()
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
        atomic_write_json(tmp_dir / SHARD_INFO_FILE, info)
    return info


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


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
) -> TeacherLogitsCache:
    """Run a teacher once over a tokenized dataset and store its top-k next-token log-probabilities.

    For row `r` with `S` tokens, cache row `r` holds `S - 1` positions: position `i` is the teacher's
    distribution after reading `input_ids[: i + 1]`, i.e. its prediction of `input_ids[i + 1]` (the trainer's
    causal shift, `labels[:, 1:]`). Per position: the `top_k` largest log-probabilities at `temperature`
    (float16, rounded toward -inf) and their token ids (uint16 when the vocabulary has <= 65,536 entries, else
    int32). The tail log-mass `log(1 - sum p)` is derived on read (:func:`tail_logprob_from_topk`).

    Writing is robust: rows are cut into shards of `shard_size` rows, each written to a temporary folder and
    renamed into place, so no half shard is ever visible. Calling again with the same arguments after an
    interruption resumes from the shards that exist (none is recomputed or duplicated). Launched with several
    processes (`torchrun`, `accelerate launch`), rank `r` of `W` computes shards `r, r + W, ...`; the main process
    writes `manifest.json` once all shards exist. Any model whose forward returns `.logits` works as teacher,
    including `EnsembleForCausalLM` (whose `logits` are the ensemble's log-probabilities).

    Args:
        teacher (`PreTrainedModel`, `torch.nn.Module` or `str`):
            The teacher, or a hub id / local folder / .gguf file loaded with :func:`hf_interop.load_causal_lm`
            (its tokenizer is then loaded too and fingerprinted).
        dataset (`datasets.Dataset`):
            Tokenized rows with `input_ids` and optionally `attention_mask` (e.g. from
            :func:`hf_interop.pack_dataset`). Other columns (`labels`, ...) are ignored.
        output_dir (`str` or `os.PathLike`):
            Folder of the cache. Must be new, empty, or an earlier cache of the same job (resumed).
        top_k (`int`, *optional*, defaults to 64):
            Log-probabilities kept per position. Higher covers more teacher mass and costs `4 * top_k` bytes per
            position.
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

    Returns:
        :class:`TeacherLogitsCache`: the finished cache, loaded memory-mapped (on every process).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # ---- cheap checks, identical on every process, before anything is loaded or written ----
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
    if isinstance(teacher, (str, os.PathLike)) and not str(teacher).endswith(".gguf"):
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

    # ---- load the teacher (the first expensive step) ----
    import torch

    # Without a GPU, Accelerate only sees the ranks of a `torchrun` launch when asked for CPU processes (gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
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
    vocab_size = _teacher_vocab_size(teacher) or vocab_size
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k={top_k} is larger than the teacher's vocabulary ({vocab_size}); use top_k <= {vocab_size}."
        )
    if vocab_size is None:
        raise ValueError(
            f"cannot tell the vocabulary size of teacher {teacher_id!r}: it has no config.vocab_size. Give it a "
            "`config` with `vocab_size` (any object)."
        )
    if tokenizer is None:
        logger.warning(
            "cache_teacher_logits got no tokenizer: the manifest will have no tokenizer fingerprint, so a trainer "
            "cannot check that the cache matches its tokenizer. Pass tokenizer=... to record it."
        )

    plan = {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": teacher_id,
        "teacher_revision": teacher_revision,
        "teacher_class": type(teacher).__name__,
        "dtype": _model_dtype(teacher),
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

    # ---- decide what to do with the folder (same decision on every process; only the main one writes) ----
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
                    "pass overwrite=True to replace them or choose another folder."
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
                + "). Pass overwrite=True to replace it, or choose another folder."
            )
        elif manifest_path.is_file():
            logger.info(f"{output_dir} already holds this complete cache; nothing to do (overwrite=True recomputes).")
            state.wait_for_everyone()
            return TeacherLogitsCache.load(output_dir)

    state.wait_for_everyone()
    if state.is_main_process:
        if start_fresh and output_dir.exists():
            _remove_cache_folder_contents(output_dir)
        else:
            for entry in output_dir.glob(".tmp-*") if output_dir.exists() else []:
                # leftovers of a killed run (no process of this job is writing yet)
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        if start_fresh or not plan_path.is_file():
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_path, plan)
    state.wait_for_everyone()

    # ---- compute this process's missing shards ----
    num_shards = plan["num_shards"]
    todo = [
        shard
        for shard in range(state.process_index, num_shards, state.num_processes)
        if not (output_dir / f"shard-{shard:05d}").is_dir()
    ]
    done_elsewhere = num_shards - len(todo)
    if done_elsewhere and todo:
        logger.info(f"Resuming {output_dir}: {len(todo)} shard(s) left for this process.", main_process_only=False)
    device = _model_device(teacher)
    was_training = getattr(teacher, "training", False)
    if hasattr(teacher, "eval"):
        teacher.eval()
    ids_dtype = plan["ids_dtype"]
    total_batches = sum(
        math.ceil((min((s + 1) * shard_size, len(dataset)) - s * shard_size) / batch_size) for s in todo
    )
    progress = tqdm(
        total=total_batches,
        desc=f"Caching teacher top-{top_k}",
        disable=not show_progress or not state.is_main_process,
    )
    reading = dataset.select_columns(
        ["input_ids"] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])
    )
    try:
        for shard in todo:
            start, end = shard * shard_size, min((shard + 1) * shard_size, len(dataset))

            def shard_rows(start: int = start, end: int = end) -> Iterator[tuple[Any, Any]]:
                for batch_start in range(start, end, batch_size):
                    input_ids, attention_mask = _rows_batch(reading, batch_start, min(batch_start + batch_size, end))
                    yield from _teacher_topk(
                        teacher, input_ids, attention_mask, top_k, temperature, device, vocab_size, ids_dtype
                    )
                    progress.update(1)

            _write_shard(output_dir, shard, start, end, shard_rows(), ids_dtype)
    finally:
        progress.close()
        if was_training and hasattr(teacher, "train"):
            teacher.train()

    # ---- the main process writes the manifest once every shard exists ----
    state.wait_for_everyone()
    if state.is_main_process:
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
            "num_processes": state.num_processes,
        }
        atomic_write_json(manifest_path, manifest)
        logger.info(
            f"Cached teacher top-{top_k} log-probs for {len(dataset)} rows in {output_dir} "
            f"({manifest['num_bytes'] / max(1, plan['num_predictions']):.1f} bytes per position)."
        )
    state.wait_for_everyone()
    return TeacherLogitsCache.load(output_dir)


def _config_vocab_size(name_or_path: str, revision: str | None) -> int | None:
    """vocab_size from config.json without loading weights (None when it cannot be read cheaply)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except Exception:  # load_causal_lm will raise the clear error
        return None
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None and hasattr(config, "get_text_config"):
        vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    return int(vocab_size) if vocab_size is not None else None


def _row_lengths(dataset: Dataset) -> list[int]:
    import pyarrow.compute as pc

    view = dataset.select_columns(["input_ids"]).with_format("arrow")
    lengths: list[int] = []
    for start in range(0, len(dataset), 65536):
        column = view[start : start + 65536].column("input_ids").combine_chunks()
        lengths.extend(pc.list_value_length(column).to_pylist())
    return lengths


def _remove_cache_folder_contents(output_dir: Path) -> None:
    """Delete an earlier cache's own files (only called after `_classify_output_dir` said "cache")."""
    for entry in output_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


class TeacherLogitsCache:
    """A finished teacher-logits cache, memory-mapped.

    Load with :meth:`load`; the trainer then calls :meth:`check_compatible`, :meth:`attach` and :meth:`collate`.

    Attributes:
        path (`Path`): the cache folder.
        manifest (`dict`): teacher id and revision, dtype, tokenizer and dataset fingerprints, `top_k`,
            `temperature`, `vocab_size`, `num_rows`, `seq_length`, shard list, ...
        dataset (`datasets.Dataset`): the stored columns, one row per dataset row (memory-mapped Arrow).
    """

    #: columns :meth:`attach` adds to a dataset (keep them through the Trainer's column pruning) and keys of the
    #: dict :meth:`collate` returns
    columns: tuple[str, ...] = (IDS_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN)
    #: columns stored on disk (the tail is derived from the log-probs)
    stored_columns: tuple[str, ...] = (IDS_COLUMN, LOGPROBS_COLUMN)

    def __init__(self, path: Path, manifest: dict[str, Any], dataset: Dataset):
        self.path = path
        self.manifest = manifest
        self.dataset = dataset
        self._tail_prior: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"TeacherLogitsCache(path={str(self.path)!r}, teacher={self.manifest.get('teacher')!r}, "
            f"top_k={self.top_k}, temperature={self.temperature}, num_rows={len(self)})"
        )

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @classmethod
    def load(cls, path: str | os.PathLike, verify_checksums: bool = False) -> TeacherLogitsCache:
        """Open a cache folder written by :func:`cache_teacher_logits`, memory-mapped.

        Checks that the manifest exists and that every shard it lists is present, has the recorded byte size and
        row count, and reads as Arrow; with `verify_checksums=True` also the sha256 of every shard (reads all
        bytes once).

        Args:
            path (`str` or `os.PathLike`): the cache folder.
            verify_checksums (`bool`, *optional*, defaults to `False`): also compare every shard's sha256.
        """
        from datasets import Dataset, concatenate_datasets

        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            hint = (
                "it is an unfinished cache: rerun cache_teacher_logits with the same arguments to resume it"
                if (path / PLAN_FILE).is_file()
                else "point at a folder written by hf_interop.cache_teacher_logits"
            )
            raise FileNotFoundError(f"teacher-logits cache {str(path)!r} has no {MANIFEST_FILE}; {hint}.")
        try:
            manifest = _read_json(manifest_path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error}); recompute the cache.") from error
        if manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format_version {manifest.get('format_version')!r}; this hf_interop reads "
                f"version {CACHE_FORMAT_VERSION}. Recompute the cache with this version."
            )
        parts = []
        for shard in manifest["shards"]:
            data_path = path / shard["name"] / SHARD_DATA_FILE
            fix = f"delete the folder {shard['name']} and rerun cache_teacher_logits with the same arguments"
            if not data_path.is_file():
                raise ValueError(f"shard {shard['name']} of cache {str(path)!r} is missing ({data_path}); {fix}.")
            size = data_path.stat().st_size
            if size != shard["num_bytes"]:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is truncated or corrupt: {data_path} has "
                    f"{size} bytes, the manifest says {shard['num_bytes']}; {fix}."
                )
            if verify_checksums and _sha256_file(data_path) != shard["sha256"]:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is corrupt: its sha256 differs from the manifest; "
                    f"{fix}."
                )
            try:
                part = Dataset.from_file(str(data_path), in_memory=False)
            except Exception as error:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is corrupt: {data_path} does not read as Arrow "
                    f"({error}); {fix}."
                ) from error
            if len(part) != shard["num_rows"] or set(part.column_names) != {IDS_COLUMN, LOGPROBS_COLUMN}:
                raise ValueError(
                    f"shard {shard['name']} of cache {str(path)!r} is corrupt: {len(part)} rows with columns "
                    f"{part.column_names}, expected {shard['num_rows']} rows of {[IDS_COLUMN, LOGPROBS_COLUMN]}; {fix}."
                )
            parts.append(part)
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(dataset) != manifest["num_rows"]:
            raise ValueError(
                f"cache {str(path)!r} holds {len(dataset)} rows but its manifest says {manifest['num_rows']}; "
                "recompute it (overwrite=True)."
            )
        return cls(path, manifest, dataset)

    def check_compatible(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dataset: Dataset | None = None,
        teacher: Any = None,
    ) -> None:
        """Raise `ValueError` naming the fingerprint that differs between this cache and what it is used with.

        Args:
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the student's tokenizer / processing class.
            dataset (`datasets.Dataset`, *optional*): the tokenized training set the cache will be attached to.
            teacher (`str` or model, *optional*): the teacher the caller expects (compared by name/path).
        """
        problems = []
        if teacher is not None:
            expected = _teacher_identity(teacher, None)
            if expected != self.manifest.get("teacher"):
                problems.append(
                    f"teacher differs: the cache was made with {self.manifest.get('teacher')!r}, not {expected!r}"
                )
        if tokenizer is not None:
            recorded = self.manifest.get("tokenizer_fingerprint")
            if recorded is None:
                logger.warning_once(
                    f"cache {self.path} records no tokenizer fingerprint (made without tokenizer=...); the tokenizer "
                    "cannot be checked."
                )
            else:
                actual = tokenizer_fingerprint(tokenizer)
                if actual != recorded:
                    problems.append(
                        f"tokenizer fingerprint differs ({actual} now, {recorded} in the cache): the cache was made "
                        "with another tokenizer, so its token ids mean other tokens"
                    )
            if len(tokenizer) > self.vocab_size:
                problems.append(f"the tokenizer has {len(tokenizer)} tokens, the cache's vocabulary {self.vocab_size}")
        if dataset is not None:
            actual = dataset_fingerprint(dataset)
            if actual != self.manifest.get("dataset_fingerprint"):
                problems.append(
                    f"dataset fingerprint differs ({actual} now, {self.manifest.get('dataset_fingerprint')} in the "
                    f"cache): the rows (token ids, order or count: {len(dataset)} now, {self.manifest['num_rows']} "
                    "cached) are not the ones the teacher saw"
                )
        if problems:
            raise ValueError(
                f"teacher-logits cache {str(self.path)!r} does not match: "
                + "; ".join(problems)
                + ". Recompute the cache for this tokenizer/dataset (hf_interop.cache_teacher_logits) or use the "
                "matching ones."
            )

    def attach(self, dataset: Dataset, include_tail: bool = True) -> Dataset:
        """Return `dataset` with the cache's columns added, row for row (same rows, same order).

        Adds `teacher_topk_ids` and `teacher_topk_logprobs` (one flat list of `(S - 1) * top_k` values per row,
        memory-mapped from the cache) and, with `include_tail`, `teacher_tail_logprob` (`S - 1` float32 values per
        row). The tail is not stored on disk: it is derived here from the stored float16 log-probs and held in
        memory (4 bytes per position, 1/64 of the cache at k=64). With `include_tail=False` nothing is held in
        memory and :meth:`collate` derives the tail per batch instead; the values are identical. The cache columns
        are read as numpy arrays (no per-value Python objects). Call :meth:`check_compatible` first: `attach`
        itself checks only the row count and every row's length.

        Args:
            dataset (`datasets.Dataset`): the tokenized dataset the cache was made from.
            include_tail (`bool`, *optional*, defaults to `True`): add the `teacher_tail_logprob` column.
        """
        import pyarrow.compute as pc
        from datasets import Dataset, concatenate_datasets

        _check_input_ids_column(dataset)
        if len(dataset) != len(self):
            raise ValueError(
                f"dataset has {len(dataset)} rows but cache {str(self.path)!r} has {len(self)}; attach the cache "
                "to the dataset it was made from (check_compatible says what differs)."
            )
        dataset_lengths = _row_lengths(dataset)
        cache_view = self.dataset.select_columns([IDS_COLUMN]).with_format("arrow")
        for start in range(0, len(self), 65536):
            column = cache_view[start : start + 65536].column(IDS_COLUMN).combine_chunks()
            cached = pc.list_value_length(column).to_pylist()
            for offset, value in enumerate(cached):
                row = start + offset
                if value != (dataset_lengths[row] - 1) * self.top_k:
                    raise ValueError(
                        f"row {row} has {dataset_lengths[row]} tokens but the cache holds "
                        f"{value // self.top_k} positions for it (expected {dataset_lengths[row] - 1}); the cache "
                        "belongs to another dataset."
                    )
        added = [IDS_COLUMN, LOGPROBS_COLUMN] + ([TAIL_COLUMN] if include_tail else [])
        clashing = [name for name in (IDS_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN) if name in dataset.column_names]
        if clashing:
            dataset = dataset.remove_columns(clashing)
        previous_format = dataset.format
        parts = [dataset.with_format(None), self.dataset.with_format(None)]
        if include_tail:
            from datasets.table import InMemoryTable

            parts.append(Dataset(InMemoryTable(self._tail_table())))
        combined = concatenate_datasets(parts, axis=1)
        if previous_format["type"] is None:
            combined = combined.with_format("numpy", columns=added, output_all_columns=True)
        else:
            columns = previous_format["columns"]
            combined = combined.with_format(
                previous_format["type"],
                columns=None if columns is None else [*columns, *added],
                output_all_columns=previous_format["output_all_columns"],
                **previous_format["format_kwargs"],
            )
        return combined

    def _tail_table(self) -> Any:
        """`teacher_tail_logprob` for every row, derived from the stored log-probs, as an in-memory Arrow table."""
        import numpy as np
        import pyarrow as pa
        import torch

        k = self.top_k
        pieces = []
        for chunk in self.dataset.data.column(LOGPROBS_COLUMN).chunks:
            offsets = np.asarray(chunk.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
            values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float16)  # a writable copy
            tail = tail_logprob_from_topk(torch.from_numpy(values.reshape(-1, k))).numpy()
            pieces.append(
                pa.LargeListArray.from_arrays(pa.array((offsets - offsets[0]) // k, type=pa.int64()), pa.array(tail))
            )
        column = pa.chunked_array(pieces, type=pa.large_list(pa.float32()))
        return pa.table({TAIL_COLUMN: column})

    def tail_prior_logprobs(self) -> torch.Tensor:
        """The teacher's mean next-token distribution over every cached position, estimated from the cache alone.

        Each cached position contributes its stored top-k probabilities and spreads its tail mass evenly over the
        other `vocab_size - top_k` tokens, so every token gets a probability > 0; the result is their mean. Passed
        as `teacher_tail_prior_logprobs` to the sparse losses (`DistillationConfig.sparse_tail="teacher_marginal"`),
        it shapes the teacher's tail: a token the teacher often ranks high elsewhere gets more of a position's
        tail mass than one it never ranks. Reads every stored log-prob once (computed on the first call, then
        kept on this object).

        Returns:
            `torch.Tensor` of shape `(vocab_size,)`, float32 log-probabilities (they sum to 1 in probability).
        """
        import numpy as np
        import torch

        if self._tail_prior is not None:
            return self._tail_prior
        k, vocab = self.top_k, self.vocab_size
        tail_tokens = vocab - k
        totals = torch.zeros(vocab, dtype=torch.float64)
        spread = 0.0  # tail mass each token outside a position's top-k receives, summed over positions
        num_positions = 0
        for batch in self.dataset.data.to_batches():
            ids_column, logprobs_column = batch.column(IDS_COLUMN), batch.column(LOGPROBS_COLUMN)
            ids = torch.from_numpy(ids_column.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
            values = logprobs_column.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
            logprobs = torch.from_numpy(values).reshape(-1, k)
            if not logprobs.numel():
                continue
            probs = logprobs.double().exp()
            num_positions += probs.shape[0]
            if tail_tokens > 0:
                per_tail_token = tail_logprob_from_topk(logprobs).double().exp() / tail_tokens
                spread += float(per_tail_token.sum())
                # a position's top-k ids get their probability instead of that position's even share of the tail
                probs = probs - per_tail_token.unsqueeze(-1)
            totals.index_add_(0, ids, probs.reshape(-1))
        if num_positions == 0:
            raise ValueError(
                f"cache {str(self.path)!r} holds no cached positions; there is no distribution to average."
            )
        mean = (totals + spread).div_(num_positions)
        # a token no position ranked, in a cache whose every tail rounded to 0, would get log(0): floor it
        self._tail_prior = mean.clamp_min_(torch.finfo(torch.float32).tiny).log_().float()
        return self._tail_prior

    def collate(self, features: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Stack the cache columns of a batch of rows (from :meth:`attach`) into tensors.

        Rows of different lengths are padded to the longest (on `padding_side`, matching how the data collator
        pads `input_ids`); padded positions get id 0, log-prob `PAD_LOGPROB` (zero probability, finite) and a tail
        log-prob of 0 (all the mass). They carry label -100, so no loss sees them. Rows without a
        `teacher_tail_logprob` value (`attach(include_tail=False)`) get it derived from their log-probs.

        Returns:
            `dict` with `teacher_topk_ids` `(B, S-1, k)` int64, `teacher_topk_logprobs` `(B, S-1, k)` float32 and
            `teacher_tail_logprob` `(B, S-1)` float32.
        """
        import numpy as np
        import torch

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if not features:
            raise ValueError("collate got an empty batch.")
        k = self.top_k
        ids_rows, logprob_rows, tail_rows = [], [], []
        for feature in features:
            if IDS_COLUMN not in feature or LOGPROBS_COLUMN not in feature:
                raise KeyError(
                    f"a batch row has no {IDS_COLUMN!r}/{LOGPROBS_COLUMN!r} (keys: {sorted(feature)}); attach the "
                    "cache to the dataset (cache.attach(dataset)) and keep its columns through column pruning."
                )
            ids_rows.append(_as_numpy(feature[IDS_COLUMN]).reshape(-1, k))
            logprob_rows.append(_as_numpy(feature[LOGPROBS_COLUMN]).reshape(-1, k))
            tail_rows.append(_as_numpy(feature[TAIL_COLUMN]).reshape(-1) if TAIL_COLUMN in feature else None)
        width = max(row.shape[0] for row in ids_rows)
        ids = np.zeros((len(features), width, k), dtype=np.int64)
        logprobs = np.full((len(features), width, k), PAD_LOGPROB, dtype=np.float32)
        tails = np.zeros((len(features), width), dtype=np.float32)
        for index, (row_ids, row_logprobs, row_tail) in enumerate(zip(ids_rows, logprob_rows, tail_rows, strict=True)):
            length = row_ids.shape[0]
            window = slice(0, length) if padding_side == "right" else slice(width - length, width)
            ids[index, window] = row_ids
            logprobs[index, window] = row_logprobs
            if row_tail is None:
                row_tail = tail_logprob_from_topk(torch.from_numpy(np.asarray(row_logprobs, dtype=np.float32))).numpy()
            tails[index, window] = row_tail
        return {
            IDS_COLUMN: torch.from_numpy(ids),
            LOGPROBS_COLUMN: torch.from_numpy(logprobs),
            TAIL_COLUMN: torch.from_numpy(tails),
        }

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` as tensors: ids `(S-1, k)` int64, log-probs `(S-1, k)` float32 (exactly the stored float16
        values) and the derived tail `(S-1,)` float32."""
        batch = self.collate([self.dataset.with_format("numpy")[int(index)]])  # derives the tail
        return {key: value[0] for key, value in batch.items()}

    def report(
        self,
        sample_rows: int = 64,
        teacher: Any = None,
        dataset: Dataset | None = None,
        batch_size: int = 4,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Size and quality of the cache.

        Args:
            sample_rows (`int`, *optional*, defaults to 64): rows sampled (seeded) for coverage and KL.
            teacher (model or `str`, *optional*): the teacher; when given (with `dataset`), KL(full || sparse) is
                measured by running it on the sampled rows.
            dataset (`datasets.Dataset`, *optional*): the dataset the cache was made from (needed with `teacher`:
                the cache does not store token ids).
            batch_size (`int`, *optional*, defaults to 4): rows per teacher forward.
            seed (`int`, *optional*, defaults to 0): sampling seed.

        Returns:
            `dict` with `bytes_on_disk` (every file of the folder), `bytes_per_token` (per dataset token),
            `bytes_per_position` (per cached prediction, S-1 per row), `payload_bytes_per_position` (`4 * top_k`
            for uint16 ids), `mean_topk_mass` (mean over sampled positions of the stored top-k probability mass),
            `kl_full_to_sparse` (mean nats per position of KL(p || q), q = stored top-k probabilities plus the tail
            mass spread evenly over the other `vocab_size - top_k` tokens; `None` without teacher),
            `kl_buckets` (KL over the k+1 buckets, i.e. the float16 storage error; `None` without teacher),
            `num_sampled_positions`.
        """
        import numpy as np
        import torch

        if sample_rows < 1:
            raise ValueError(f"sample_rows must be >= 1, got {sample_rows}.")
        bytes_on_disk = sum(entry.stat().st_size for entry in self.path.rglob("*") if entry.is_file())
        num_predictions = int(self.manifest["num_predictions"])
        num_tokens = num_predictions + int(self.manifest["num_rows"])
        ids_bytes = 2 if self.manifest["ids_dtype"] == "uint16" else 4
        rng = np.random.default_rng(seed)
        sample = sorted(rng.choice(len(self), size=min(sample_rows, len(self)), replace=False).tolist())
        masses = []
        for index in sample:
            masses.append(self.row(index)[LOGPROBS_COLUMN].double().exp().sum(-1))
        all_masses = torch.cat(masses)
        result: dict[str, Any] = {
            "top_k": self.top_k,
            "num_rows": len(self),
            "bytes_on_disk": bytes_on_disk,
            "bytes_per_token": bytes_on_disk / num_tokens,
            "bytes_per_position": bytes_on_disk / num_predictions,
            "payload_bytes_per_position": self.top_k * (ids_bytes + 2),
            "mean_topk_mass": float(all_masses.mean()),
            "kl_full_to_sparse": None,
            "kl_buckets": None,
            "num_sampled_positions": int(all_masses.numel()),
        }
        if teacher is None:
            return result
        if dataset is None:
            raise ValueError(
                "report(teacher=...) also needs dataset=... (the tokenized rows the cache was made from): the cache "
                "stores no token ids."
            )
        self.check_compatible(dataset=dataset)
        if isinstance(teacher, (str, os.PathLike)):
            from ...loading import load_causal_lm

            teacher, _ = load_causal_lm(str(teacher), revision=self.manifest.get("teacher_revision"))
        kl_sum, bucket_kl_sum, count = 0.0, 0.0, 0
        device = _model_device(teacher)
        reading = dataset.select_columns(
            ["input_ids"] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])
        )
        for batch_start in range(0, len(sample), batch_size):
            indices = sample[batch_start : batch_start + batch_size]
            rows = reading.select(indices)
            input_ids, attention_mask = _rows_batch(rows, 0, len(indices))
            full = _full_logprobs(teacher, input_ids, attention_mask, self.temperature, device)
            for offset, index in enumerate(indices):
                cached = self.row(index)
                length = len(input_ids[offset]) - 1
                kl, bucket_kl = sparse_kl(
                    full[offset, :length],
                    cached[IDS_COLUMN],
                    cached[LOGPROBS_COLUMN],
                    cached[TAIL_COLUMN],
                )
                kl_sum += float(kl.sum())
                bucket_kl_sum += float(bucket_kl.sum())
                count += length
        result["kl_full_to_sparse"] = kl_sum / count
        result["kl_buckets"] = bucket_kl_sum / count
        return result


def _as_numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _full_logprobs(
    teacher: Any, input_ids: list[list[int]], attention_mask: list[list[int]] | None, temperature: float, device: Any
) -> torch.Tensor:
    import torch

    width = max(len(row) for row in input_ids)
    ids_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    mask_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    for index, row in enumerate(input_ids):
        ids_tensor[index, : len(row)] = torch.tensor(row)
        mask_tensor[index, : len(row)] = torch.tensor(attention_mask[index]) if attention_mask is not None else 1
    with torch.no_grad():
        logits = teacher(input_ids=ids_tensor.to(device), attention_mask=mask_tensor.to(device)).logits
    return torch.log_softmax(logits[:, :-1].double().cpu() / temperature, dim=-1)


def sparse_kl(
    full_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(full || sparse) per position, in float64.

    The sparse distribution puts the stored probabilities on the top-k ids and spreads the tail mass evenly over
    the other `V - k` ids (the least informative completion). Also returns the KL over the k+1 buckets (top-k ids
    and the tail), which only measures the float16 storage error.

    Args:
        full_logprobs (`torch.Tensor`): `(N, V)` teacher log-probabilities.
        topk_ids (`torch.Tensor`): `(N, k)` cached ids.
        topk_logprobs (`torch.Tensor`): `(N, k)` cached log-probabilities.
        tail_logprob (`torch.Tensor`): `(N,)` cached tail log-mass.

    Returns:
        `(kl, bucket_kl)`, each `(N,)` float64.
    """
    import torch

    full = full_logprobs.double()
    vocab_size, k = full.shape[-1], topk_ids.shape[-1]
    rest = vocab_size - k
    fill = (tail_logprob.double() - math.log(rest)) if rest > 0 else torch.full_like(tail_logprob.double(), -math.inf)
    sparse = fill[:, None].expand_as(full).clone()
    sparse.scatter_(-1, topk_ids.long(), topk_logprobs.double())
    p = full.exp()
    kl = torch.where(p > 0, p * (full - sparse), torch.zeros_like(p)).sum(-1)
    p_top = full.gather(-1, topk_ids.long())
    p_tail_mass = (1.0 - p_top.exp().sum(-1)).clamp(min=0.0)
    bucket_top = torch.where(p_top.exp() > 0, p_top.exp() * (p_top - topk_logprobs.double()), torch.zeros_like(p_top))
    bucket_tail = torch.where(
        p_tail_mass > 0, p_tail_mass * (p_tail_mass.clamp(min=1e-300).log() - tail_logprob.double()), 0.0
    )
    return kl, bucket_top.sum(-1) + bucket_tail
