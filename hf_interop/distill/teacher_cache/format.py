"""The format of a teacher-logits cache folder: file and column names, fingerprints, float16 storage, the tail.

What the writer and the reader share (the folder layout is described in `hf_interop.distill.teacher_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

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
    mass = topk_logprobs.double().exp().sum(-1)
    tail_mass = (1.0 - mass).clamp(min=torch.finfo(torch.float32).tiny)
    return tail_mass.log().float()


# --------------------------------------------------------------------------------------------------------------
# Shared by the writer and the reader
# --------------------------------------------------------------------------------------------------------------


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


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.device.type != "meta":
                return parameter.device
    return torch.device("cpu")


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
