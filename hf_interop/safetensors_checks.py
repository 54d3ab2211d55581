"""Safetensors files checked before they are trusted: headers only, no tensor is read.

A download cut short, a disk that flipped bits or a file that is not safetensors at all fails here with one
:class:`~hf_interop.loading.ModelLoadingError` that names the file, says whether it is truncated or corrupt, and
gives the fix, instead of a bare `MemoryError`, `UnicodeDecodeError` or `SafetensorError` from deeper down.
:func:`~hf_interop.load_causal_lm` checks a checkpoint this way before `from_pretrained`, and
:func:`~hf_interop.merge_checkpoints` reads its inputs' headers through :func:`read_safetensors_header`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ModelLoadingError

# safetensors refuses headers above 100 MB, so a larger length field means the file does not start with a header.
_SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2}
_SAFETENSORS_DTYPE_BYTES |= {"BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_REDOWNLOAD = (
    "Download it again (or re-save the checkpoint with `save_pretrained`); damaged weights are never loaded or merged."
)


def _damaged(path: Path, state: str, detail: str) -> ModelLoadingError:
    return ModelLoadingError(f"safetensors file {str(path)!r} is {state}: {detail}. {_REDOWNLOAD}")


def _tensor_entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry (`None` when it is well formed and its size fits its shape)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return "its entry has no dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        return f"its shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(value) is int for value in offsets)):
        return f"its data_offsets {offsets!r} are not [begin, end]"
    if not 0 <= offsets[0] <= offsets[1]:
        return f"its data_offsets {offsets} run backwards"
    element_bytes = _SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
    num_elements = 1
    for size in shape:
        num_elements *= size
    if element_bytes is not None and offsets[1] - offsets[0] != num_elements * element_bytes:
        return f"it spans {offsets[1] - offsets[0]} bytes but {entry['dtype']} {shape} needs {num_elements * element_bytes}"
    return None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its tensor data starts, checked against the file.

    Reads only the header. The 8-byte header length must fit the file, the header must be a UTF-8 JSON object of
    tensor entries, and their byte ranges must tile the data exactly, as the safetensors loader requires.

    Raises:
        `ModelLoadingError`: naming the file, whether it is truncated or corrupt, and the fix.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _damaged(path, "truncated", f"it has {size} bytes, fewer than the 8 of its header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if not 2 <= header_length <= _SAFETENSORS_MAX_HEADER_BYTES:
            raise _damaged(path, "corrupt", f"its first 8 bytes give an impossible header length ({header_length})")
        if 8 + header_length > size:
            raise _damaged(path, "truncated", f"its {header_length}-byte header is cut off after {size - 8} bytes")
        raw_header = handle.read(header_length)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError both are
        raise _damaged(path, "corrupt", f"its header is not UTF-8 JSON ({error})") from error
    if not isinstance(header, dict):
        raise _damaged(path, "corrupt", f"its header is a JSON {type(header).__name__}, not an object")
    spans = []
    for name, entry in header.items():
        problem = None if name == "__metadata__" else _tensor_entry_problem(entry)
        if problem is not None:
            raise _damaged(path, "corrupt", f"tensor {name!r}: {problem}")
        if name != "__metadata__":
            spans.append((*entry["data_offsets"], name))
    end_of_data = 0
    for begin, end, name in sorted(spans):
        if begin != end_of_data:
            raise _damaged(path, "corrupt", f"tensor {name!r} starts at data byte {begin}, not {end_of_data}")
        end_of_data = end
    data_bytes = size - 8 - header_length
    if end_of_data > data_bytes:
        raise _damaged(path, "truncated", f"its tensors need {end_of_data} bytes of data but it holds {data_bytes}")
    if end_of_data < data_bytes:
        raise _damaged(path, "corrupt", f"{data_bytes - end_of_data} unexplained bytes follow its last tensor")
    return header, 8 + header_length


def read_safetensors_index(index_path: str | os.PathLike) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a `model.safetensors.index.json`, or a clear error."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadingError(
            f"safetensors index {str(index_path)!r} is corrupt: it is not JSON with a weight_map ({error!r}). "
            f"{_REDOWNLOAD}"
        ) from error
    if not isinstance(weight_map, dict) or not all(isinstance(value, str) for value in weight_map.values()):
        raise ModelLoadingError(f"safetensors index {str(index_path)!r} is corrupt: bad weight_map. {_REDOWNLOAD}")
    return weight_map


def check_safetensors_checkpoint(
    folder: str | os.PathLike, file_names: list[str] | None = None, missing_ok: bool = False
) -> dict[str, tuple[dict[str, Any], int]]:
    """Headers (see :func:`read_safetensors_header`) of the weights `from_pretrained` reads from `folder`: the
    shards its index lists (each must exist and hold the tensors the index puts there), else `file_names`
    (defaults to `model.safetensors` when present). `missing_ok` skips absent shards (a hub cache not yet filled)."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    weight_map = read_safetensors_index(index_path) if index_path.is_file() else {}
    if weight_map:
        file_names = sorted(set(weight_map.values()))
    elif file_names is None:
        file_names = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    headers = {}
    for file_name in file_names:
        if not (folder / file_name).is_file():
            if missing_ok:
                continue
            raise ModelLoadingError(
                f"shard {file_name!r}, listed in {str(index_path)!r}, is missing from {str(folder)!r}: the download "
                f"or save was incomplete. {_REDOWNLOAD}"
            )
        headers[file_name] = read_safetensors_header(folder / file_name)
        absent = [
            name for name, shard in weight_map.items() if shard == file_name and name not in headers[file_name][0]
        ]
        if absent:
            raise _damaged(folder / file_name, "corrupt", f"it lacks {absent[:3]}, which {index_path.name} puts there")
    return headers


def hub_snapshot_folder(repo_id: str, revision: str | None = None) -> Path | None:
    """The local cache folder of `repo_id@revision` when its config is cached (where `from_pretrained` reads)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def unreadable_weights_error(name_or_path: str, folder: Path | None, error: Exception) -> ModelLoadingError:
    """The error for a `SafetensorError` of `from_pretrained` on `name_or_path` (its files in `folder`): the file the
    header checks find damaged, else the one weights file, else the checkpoint."""
    if folder is not None:
        try:
            check_safetensors_checkpoint(folder)
        except ModelLoadingError as precise:
            return precise
        files = sorted(folder.glob("*.safetensors"))
        if len(files) == 1:
            return _damaged(files[0], "corrupt or truncated", f"safetensors cannot read it ({error})")
    where = f" in {str(folder)!r}" if folder is not None else ""
    return ModelLoadingError(
        f"a safetensors file of {name_or_path!r}{where} is corrupt or truncated: safetensors cannot read it ({error})."
        f" {_REDOWNLOAD}"
    )
