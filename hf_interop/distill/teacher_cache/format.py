"""The format of a teacher-logits cache folder: file and column names, fingerprints, float16 storage, the tail.

What the writer and the reader share (the folder layout is described in `hf_interop.distill.teacher_cache`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...evaluation import model_device as _model_device  # noqa: F401  (the writer and the reader use it)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

# 1: float16 log-probs and uint16/int32 ids, `top_k` per position (`encoding="float16"`); 2: the compact encoding of
# `codec.py` (`encoding="compact"`, adaptive k, quantised log-probs, Elias-Fano ids); 3: `codec.py`'s sampled encoding
# (`encoding="sampled"`: draw counts of `sample_draws` draws, Elias-Fano ids). A reader refuses any other.
FLOAT16_FORMAT_VERSION = 1
COMPACT_FORMAT_VERSION = 2
SAMPLED_FORMAT_VERSION = 3
CACHE_FORMAT_VERSION = SAMPLED_FORMAT_VERSION
READABLE_FORMAT_VERSIONS = (FLOAT16_FORMAT_VERSION, COMPACT_FORMAT_VERSION, SAMPLED_FORMAT_VERSION)
ENCODED_FORMAT_VERSIONS = (COMPACT_FORMAT_VERSION, SAMPLED_FORMAT_VERSION)  # decoded by codec.decode_dense
ENCODINGS = ("compact", "float16", "sampled")
COMPRESSIONS = (None, "zstd", "lz4")
# what a plan written before encodings existed (format version 1) means by the keys it lacks; a format-2 plan lacks
# the sampling keys
_LEGACY_PLAN_VALUES = {
    "encoding": "float16",
    "top_p": None,
    "logprob_bits": 16,
    "compression": None,
    "sample_draws": None,
    "sample_seed": None,
}
# cache_teacher_logits' defaults for the compact encoding, chosen by `bench_teacher_cache_encodings.py --settings
# frontier` (results/teacher_cache_frontier.md): with top_k 64, top_p 0.98 and 6-bit codes the students' held-out
# perplexity matched the float16 k=64 cache's (0.998x, 3 seeds) at 0.47x its size; top_p 1.0 with 8-bit codes took
# 0.62x for the same quality, and every setting under 64 bytes/token cost 1.7-7% of perplexity.
DEFAULT_TOP_P = 0.98
DEFAULT_LOGPROB_BITS = 6
# the sampled encoding's draws per position, from `bench_teacher_cache_encodings.py --settings sampled`: the most draws
# under 64 bytes per token for SmolLM2 (49.9), students 0.971x the float16 k=64 cache's perplexity (3 seeds)
DEFAULT_SAMPLE_DRAWS = 64
MAX_SAMPLE_DRAWS = 4096  # a row's draws are held as (positions, draws) int64 while it is encoded
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
    import pyarrow.compute as pc

    _check_input_ids_column(dataset)
    columns = _token_columns(dataset)
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


# A teacher fingerprint hashes, of every weight tensor, this many evenly spaced runs of this many consecutive values
# (a tensor of at most 4,096 values whole): 16 KB per tensor, so a 135M-parameter teacher is fingerprinted in
# milliseconds, from memory or from its safetensors files, and a retrained teacher (whose every weight moved) cannot
# match. A change confined to a few values of one large tensor can go unseen.
_FINGERPRINT_RUNS = 16
_FINGERPRINT_RUN_VALUES = 256
# config keys that say how a model was loaded or is run, not what it computes
_CONFIG_KEYS_IGNORED = frozenset(
    {
        "architectures",
        "dtype",
        "name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def teacher_fingerprint(teacher: Any, dtype: str | torch.dtype | None = None) -> str | None:
    """Content hash of a teacher: its config and a sample of every weight tensor's values.

    A model and the safetensors folder it was loaded from get the same fingerprint (weights are compared by value,
    as float32, whatever their names or tying), so a cache made from a model loaded in memory can be checked against
    the folder and the other way round. What is hashed: the config (`config.to_dict()` without the keys that only say
    how the model is loaded or run: dtype, `use_cache`, `_name_or_path`, versions, ...) and, of every tensor of the
    state dict, its shape and 16 evenly spaced runs of 256 values (the whole tensor when it has fewer). Reads about
    16 KB per tensor: milliseconds for SmolLM2-135M, in memory or from disk.

    Args:
        teacher (`torch.nn.Module`, `str` or `os.PathLike`): a model, or a local folder with `config.json` and
            `*.safetensors` weights.
        dtype (`str` or `torch.dtype`, *optional*): for a folder, the dtype the teacher runs in (e.g. the
            `"bfloat16"` of a float32 checkpoint loaded with `dtype="bfloat16"`): its values are rounded to it
            first, as loading does. Defaults to the files' own dtypes. Ignored for a model.

    Returns:
        `str` (`"sha256:<hex>"`), or `None` when `teacher` cannot be fingerprinted cheaply (a hub id, a `.gguf` file,
        a folder of pickle weights or adapters only, an object without weights).
    """
    if isinstance(teacher, (str, os.PathLike)):
        return _folder_fingerprint(Path(teacher), dtype)
    if not isinstance(teacher, torch.nn.Module):
        return None
    digests = {
        _values_digest(tuple(tensor.shape), _sampled_values(tensor)) for tensor in teacher.state_dict().values()
    }
    if not digests:
        return None
    return _combine_fingerprint(getattr(teacher, "config", None), digests)


def _folder_fingerprint(folder: Path, dtype: str | torch.dtype | None) -> str | None:
    weight_files = _safetensors_files(folder) if folder.is_dir() else []
    if not weight_files:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    except Exception:  # custom code, unreadable config: not cheaply comparable
        return None
    target = _floating_dtype(dtype)
    digests = set()
    for weight_file in weight_files:
        with open(weight_file, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                file_dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if file_dtype is None:
                    return None  # float8 and other formats a loader converts in its own way
                values = _read_sampled_values(handle, 8 + header_length + entry["data_offsets"][0], entry, file_dtype)
                if target is not None and values.is_floating_point():
                    values = values.to(target)
                digests.add(_values_digest(tuple(entry["shape"]), _hashable(values)))
    return _combine_fingerprint(config, digests)


def _floating_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`dtype` as a floating `torch.dtype`; `None` for `None`, `"auto"`, `"unknown"` and non-float dtypes."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a transformers checkpoint folder (sharded or not); none for adapters or pickle weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _sample_runs(numel: int) -> list[tuple[int, int]]:
    """`(start, end)` of the runs of values a fingerprint hashes in a tensor of `numel` values."""
    if numel <= _FINGERPRINT_RUNS * _FINGERPRINT_RUN_VALUES:
        return [(0, numel)]
    last_start = numel - _FINGERPRINT_RUN_VALUES
    starts = [index * last_start // (_FINGERPRINT_RUNS - 1) for index in range(_FINGERPRINT_RUNS)]
    return [(start, start + _FINGERPRINT_RUN_VALUES) for start in starts]


def _sampled_values(tensor: torch.Tensor) -> bytes:
    if tensor.device.type == "meta":
        return b"meta"
    flat = tensor.detach().reshape(-1)
    values = torch.cat([flat[start:end] for start, end in _sample_runs(flat.numel())])
    return _hashable(values.cpu())


def _read_sampled_values(handle: Any, data_start: int, entry: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    item_size = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(entry["shape"])
    chunks = []
    for start, end in _sample_runs(numel):
        handle.seek(data_start + start * item_size)
        chunks.append(handle.read((end - start) * item_size))
    raw = bytearray(b"".join(chunks))
    return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _hashable(values: torch.Tensor) -> bytes:
    """Values as bytes in a form that does not depend on how they are stored: float64 stays, other floats become
    float32 (exact for bfloat16/float16), integers and booleans int64."""
    if values.dtype == torch.float64:
        return values.numpy().astype("<f8").tobytes()
    if values.is_floating_point():
        return values.float().numpy().astype("<f4").tobytes()
    return values.to(torch.int64).numpy().astype("<i8").tobytes()


def _values_digest(shape: tuple[int, ...], values: bytes) -> str:
    return hashlib.sha256(json.dumps(list(shape)).encode() + b"|" + values).hexdigest()


def _combine_fingerprint(config: Any, digests: set[str]) -> str:
    combined = hashlib.sha256(b"hf_interop-teacher-v1")
    combined.update(json.dumps(_config_state(config), sort_keys=True, default=str).encode("utf-8"))
    for digest in sorted(digests):  # a set: tied weights count once, names and order do not matter
        combined.update(bytes.fromhex(digest))
    return "sha256:" + combined.hexdigest()


def _config_state(config: Any) -> Any:
    if config is None or not hasattr(config, "to_dict"):
        return None
    return _without_run_keys(config.to_dict())


def _without_run_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_run_keys(item)
            for key, item in value.items()
            if not str(key).startswith("_") and key not in _CONFIG_KEYS_IGNORED
        }
    return value


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
    if topk_logprobs.device.type == "cpu":
        # numpy: its float64 exp took a tenth of torch's on the 2-core CPU machines (this runs in every collate)
        values = topk_logprobs.detach().double().numpy()
        kept = values > PAD_LOGPROB
        # entries without mass add nothing; exp of 0 in their place, not of -1e4 (an underflow, slower)
        mass = (np.exp(np.where(kept, values, 0.0)) * kept).sum(-1)
        tail_mass = np.maximum(1.0 - mass, float(torch.finfo(torch.float32).tiny))
        return torch.from_numpy(np.log(tail_mass).astype(np.float32))
    values = topk_logprobs.double()
    kept = kept_entries(values)
    mass = torch.where(kept, values, 0.0).exp().mul_(kept).sum(-1)
    tail_mass = (1.0 - mass).clamp(min=torch.finfo(torch.float32).tiny)
    return tail_mass.log().float()


def kept_entries(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Which cached entries hold mass: log-prob above `PAD_LOGPROB`. The others (`PAD_LOGPROB`, `-inf`: entries
    adaptive k did not keep, missing entries of a served teacher, padding) count as zero probability."""
    return topk_logprobs > PAD_LOGPROB


# --------------------------------------------------------------------------------------------------------------
# Shared by the writer and the reader
# --------------------------------------------------------------------------------------------------------------


def _cache_format_version(encoding: str) -> int:
    return {"compact": COMPACT_FORMAT_VERSION, "sampled": SAMPLED_FORMAT_VERSION}.get(encoding, FLOAT16_FORMAT_VERSION)


def _compact_schema(top_k: int, logprob_bits: int | None, sample_draws: int | None = None):
    """Arrow schema of a format-2 or -3 shard: one list per row and stored column (see `codec.py`)."""
    import pyarrow as pa

    from .codec import COUNTS_COLUMN, SCALE_COLUMN, TOP_COLUMN, compact_columns, counts_dtype, max_entries

    types = {
        COUNTS_COLUMN: pa.from_numpy_dtype(counts_dtype(max_entries(top_k, sample_draws))),
        TOP_COLUMN: pa.float16(),
        SCALE_COLUMN: pa.float16(),
    }
    return pa.schema(
        [(name, pa.large_list(types.get(name, pa.uint8()))) for name in compact_columns(logprob_bits, sample_draws)]
    )


def _cache_features(ids_dtype: str):
    from datasets import Features, LargeList, Value

    return Features({IDS_COLUMN: LargeList(Value(ids_dtype)), LOGPROBS_COLUMN: LargeList(Value("float16"))})


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


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _row_lengths(dataset: Dataset) -> list[int]:
    import pyarrow.compute as pc

    view = dataset.select_columns(["input_ids"]).with_format("arrow")
    lengths: list[int] = []
    for start in range(0, len(dataset), 65536):
        column = view[start : start + 65536].column("input_ids").combine_chunks()
        lengths.extend(pc.list_value_length(column).to_pylist())
    return lengths


def _rows_batch(dataset: Dataset, start: int, end: int) -> tuple[list[list[int]], list[list[int]] | None]:
    rows = dataset[start:end]
    input_ids = [list(map(int, row)) for row in rows["input_ids"]]
    attention_mask = None
    if "attention_mask" in rows:
        attention_mask = [list(map(int, row)) for row in rows["attention_mask"]]
    return input_ids, attention_mask


def _token_columns(dataset: Dataset) -> list[str]:
    """What the teacher reads of a row: `input_ids`, and `attention_mask` when the dataset has one."""
    return ["input_ids"] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])


def _padded_batch(
    input_ids: list[list[int]], attention_mask: list[list[int]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as right-padded int64 `(input_ids, attention_mask)` tensors (padding: id 0, mask 0)."""
    width = max(len(row) for row in input_ids)
    ids_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    mask_tensor = torch.zeros(len(input_ids), width, dtype=torch.long)
    for index, row in enumerate(input_ids):
        ids_tensor[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        if attention_mask is not None:
            mask_tensor[index, : len(row)] = torch.tensor(attention_mask[index], dtype=torch.long)
        else:
            mask_tensor[index, : len(row)] = 1
    return ids_tensor, mask_tensor


def default_encoding(served: bool) -> str:
    """`cache_teacher_logits`' encoding when none is given: `"sampled"` for an in-process teacher (the smallest cache
    and the best students in `benchmarks/results/teacher_cache_sampled.md`), `"compact"` for a served one (a server
    returns its top-k only, and draws from a top-k and its tail trained worse students than top-p truncation)."""
    return "compact" if served else "sampled"


def _checked_encoding(
    encoding: str | None,
    top_p: float | None,
    logprob_bits: int | None,
    compression: str | None,
    sample_draws: int | None = None,
    sample_seed: int | None = None,
    served: bool = False,
) -> dict[str, Any]:
    """The plan keys of the encoding (`None`: the encoding's default; for `encoding` itself, the default for an
    in-process or a `served` teacher), checked before anything is loaded."""
    if encoding is None:
        encoding = default_encoding(served)
    if encoding not in ENCODINGS:
        raise ValueError(
            f"encoding must be one of {ENCODINGS}, got {encoding!r}; leave it unset for the default ('sampled' for an "
            "in-process teacher, 'compact' for a served one)."
        )
    if encoding != "sampled" and (sample_draws is not None or sample_seed is not None):
        raise ValueError(
            f"sample_draws={sample_draws!r} and sample_seed={sample_seed!r} apply to encoding='sampled' only; leave "
            f"them unset with encoding={encoding!r}, or use encoding='sampled'."
        )
    if encoding == "float16":
        if top_p not in (None, 1, 1.0) or logprob_bits not in (None, 16):
            raise ValueError(
                f"encoding='float16' stores all top_k float16 log-probs (format version 1); top_p={top_p!r} and "
                f"logprob_bits={logprob_bits!r} apply to encoding='compact'. Leave them unset, or use "
                "encoding='compact'."
            )
        top_p, logprob_bits = None, 16
    elif encoding == "sampled":
        if top_p is not None or logprob_bits is not None:
            raise ValueError(
                f"encoding='sampled' stores draw counts, not top-p entries or log-prob codes; top_p={top_p!r} and "
                f"logprob_bits={logprob_bits!r} apply to encoding='compact'. Leave them unset (the size is set by "
                "sample_draws), or use encoding='compact'."
            )
        sample_draws = DEFAULT_SAMPLE_DRAWS if sample_draws is None else sample_draws
        sample_seed = 0 if sample_seed is None else sample_seed
        if (
            not isinstance(sample_draws, int)
            or isinstance(sample_draws, bool)
            or not (1 <= sample_draws <= MAX_SAMPLE_DRAWS)
        ):
            raise ValueError(
                f"sample_draws must be an integer in [1, {MAX_SAMPLE_DRAWS}], got {sample_draws!r}; "
                f"{DEFAULT_SAMPLE_DRAWS} (the default) draws {DEFAULT_SAMPLE_DRAWS} tokens per position."
            )
        if not isinstance(sample_seed, int) or isinstance(sample_seed, bool) or sample_seed < 0:
            raise ValueError(f"sample_seed must be a non-negative integer, got {sample_seed!r}.")
    else:
        top_p = DEFAULT_TOP_P if top_p is None else top_p
        logprob_bits = DEFAULT_LOGPROB_BITS if logprob_bits is None else logprob_bits
    if top_p is not None and (
        not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not (0 < top_p <= 1) or math.isnan(top_p)
    ):
        raise ValueError(
            f"top_p must be a number in (0, 1], got {top_p!r}; {DEFAULT_TOP_P} (the default) keeps the fewest "
            "entries holding 98% of a position's probability, 1.0 all top_k."
        )
    from .codec import LOGPROB_BITS

    if encoding != "sampled" and (logprob_bits not in LOGPROB_BITS or isinstance(logprob_bits, bool)):
        raise ValueError(
            f"logprob_bits must be one of {LOGPROB_BITS} (the log-prob code widths the cache format supports), got "
            f"{logprob_bits!r}; {DEFAULT_LOGPROB_BITS} is the default."
        )
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}.")
    if compression is not None:
        import pyarrow as pa

        if not pa.Codec.is_available(compression):
            raise ValueError(f"compression={compression!r} is not available in this pyarrow build; use None.")
    plan = {
        "format_version": _cache_format_version(encoding),
        "encoding": encoding,
        "top_p": None if top_p is None else float(top_p),
        "logprob_bits": None if logprob_bits is None else int(logprob_bits),
        "compression": compression,
    }
    if encoding == "sampled":  # (a format-1 or -2 plan has no such keys; resumes compare plans key by key)
        plan.update(sample_draws=int(sample_draws), sample_seed=int(sample_seed))
    return plan


def _shard_encoding(plan: dict[str, Any]) -> dict[str, Any]:
    """How a shard of `plan` is encoded (the keys a plan of format version 1 lacks take their old meaning)."""
    return {key: plan.get(key, _LEGACY_PLAN_VALUES[key]) for key in _LEGACY_PLAN_VALUES} | {
        "top_k": plan["top_k"],
        "vocab_size": plan["vocab_size"],
    }
