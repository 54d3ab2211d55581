"""Merging without holding models in memory: safetensors checkpoints read by row blocks, output shards written
as merged blocks arrive, and the chunked merge of one tensor that connects them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..loading import ModelLoadingError
from ..safetensors_checks import check_safetensors_checkpoint
from .methods import (
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    KthLargest,
    _breadcrumbs_bounds,
    _breadcrumbs_ranks,
    _trim_rank,
    dare_keep_mask,
    merge_tensors,
    model_stock_cosine,
    model_stock_ratio,
    seeded_uniforms,
    slerp_coefficients,
)

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# ----------------------------------------------------------------------------------------------------------------
# Chunked merging: the same math over row blocks, so no more than a few blocks are in memory
# ----------------------------------------------------------------------------------------------------------------

# Elements per row block and per input (1M float32 = 4 MiB): the math holds ~15 such blocks at once, so this
# keeps the working set near 60 MiB while blocks stay large enough to be fast.
CHUNK_ELEMENTS = 2**20

RowReader = Callable[[int, int], "torch.Tensor"]  # (start_row, end_row) -> those rows of a tensor


def _merge_tensor_in_chunks(
    name: str,
    shape: tuple[int, ...],
    readers: list[RowReader],
    base_reader: RowReader | None,
    method: str,
    weights: list[float],
    density: float,
    seed: int,
    slerp_t: float,
    emit: Callable[[torch.Tensor], None],
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    weights_of: Callable[[str], list[float]] | None = None,
) -> None:
    """Merge tensor `name` block of rows by block of rows, passing each merged block (input dtype) to `emit`.

    `readers` must return fresh tensors (they are modified in place).

    Whole-tensor quantities are computed first: TIES and breadcrumbs thresholds (exact k-th largest magnitudes
    found by radix-selection passes over row blocks, :func:`_whole_tensor_magnitude_ranks`), the SLERP angle
    (accumulated over blocks) and DARE masks (seeded per tensor name), so block-wise results equal whole-tensor
    results, and no whole task vector is ever held. DELLA's random numbers are drawn per row
    range (:func:`seeded_uniforms`) and its ranks are per row (a 1-D tensor, one row, is merged in one block), and
    Model Stock's angle is accumulated over blocks. `weights_of(name)`, when given, replaces `weights` for this
    tensor (coefficients fitted per tensor group).
    """
    if weights_of is not None:
        weights = weights_of(name)
    num_rows = shape[0] if len(shape) > 0 else 1
    row_elements = max(1, math.prod(shape[1:])) if len(shape) > 0 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_elements)
    if method in ("della", "della_linear") and len(shape) < 2:
        rows_per_chunk = num_rows  # the ranks of a 1-D tensor are over all of it
    first_block = readers[0](0, min(num_rows, rows_per_chunk))
    output_dtype = first_block.dtype
    if not output_dtype.is_floating_point:  # integer buffers are copied from the first checkpoint, not averaged
        for start in range(0, num_rows, rows_per_chunk):
            emit(readers[0](start, min(num_rows, start + rows_per_chunk)))
        return
    del first_block
    compute_dtype = torch.float64 if output_dtype == torch.float64 else torch.float32

    def block(reader: RowReader, start: int, end: int) -> torch.Tensor:
        return reader(start, end).to(compute_dtype)

    thresholds = bounds = None
    if method == "ties" and density < 1.0:
        rank = _trim_rank(math.prod(shape), density)
        selected = _whole_tensor_magnitude_ranks(
            readers, base_reader, block, shape, rows_per_chunk, [rank], compute_dtype
        )
        thresholds = [values[0] for values in selected]
    if method == "breadcrumbs":
        ranks = _breadcrumbs_ranks(math.prod(shape), density, gamma)
        positive = [rank for rank in ranks if rank > 0]
        selected = _whole_tensor_magnitude_ranks(
            readers, base_reader, block, shape, rows_per_chunk, positive, compute_dtype
        )
        bounds = [_breadcrumbs_bounds(ranks, values) for values in selected]
    stock_ratio = None
    if method == "model_stock":
        dots = {(i, j): 0.0 for i in range(len(readers)) for j in range(i + 1, len(readers))}
        squared_norms = [0.0] * len(readers)
        for start in range(0, num_rows, rows_per_chunk):
            end = min(num_rows, start + rows_per_chunk)
            base = block(base_reader, start, end).double()
            deltas = [block(reader, start, end).double().sub_(base) for reader in readers]
            for i, delta in enumerate(deltas):
                squared_norms[i] += float((delta * delta).sum())
                for j in range(i + 1, len(deltas)):
                    dots[(i, j)] += float((delta * deltas[j]).sum())
            del base, deltas
        stock_ratio = model_stock_ratio(model_stock_cosine(dots, squared_norms), len(readers))
    masks = None
    if method in ("dare_linear", "dare_ties"):
        masks = [dare_keep_mask(shape, density, seed, name, index) for index in range(len(readers))]
        masks = [mask.reshape(num_rows, -1) if len(shape) > 0 else mask.reshape(1, 1) for mask in masks]
    slerp_weights = None
    if method == "slerp":
        dot = first_square = second_square = 0.0
        for start in range(0, num_rows, rows_per_chunk):
            end = min(num_rows, start + rows_per_chunk)
            first, second = block(readers[0], start, end).double(), block(readers[1], start, end).double()
            dot += float((first * second).sum())
            first_square += float((first * first).sum())
            second_square += float((second * second).sum())
        slerp_weights = slerp_coefficients(slerp_t, dot, math.sqrt(first_square), math.sqrt(second_square))

    for start in range(0, num_rows, rows_per_chunk):
        end = min(num_rows, start + rows_per_chunk)
        tensors = [block(reader, start, end) for reader in readers]
        base = block(base_reader, start, end) if base_reader is not None else None
        block_masks = None
        if masks is not None:
            block_masks = [mask[start:end].reshape(tensors[0].shape) for mask in masks]
        uniforms = None
        if method in ("della", "della_linear"):
            uniforms = [
                seeded_uniforms(shape, seed, name, index, start, end).reshape(tensors[0].shape)
                for index in range(len(readers))
            ]
        merged = merge_tensors(
            method,
            tensors,
            weights,
            base=base,
            density=density,
            slerp_t=slerp_t,
            dare_masks=block_masks,
            trim_thresholds=thresholds,
            slerp_weights=slerp_weights,
            gamma=gamma,
            epsilon=epsilon,
            breadcrumbs_bounds=bounds,
            della_uniforms=uniforms,
            stock_ratio=stock_ratio,
        )
        emit(merged.to(output_dtype))


def _whole_tensor_magnitude_ranks(
    readers: list[RowReader],
    base_reader: RowReader,
    block: Callable[[RowReader, int, int], torch.Tensor],
    shape: tuple[int, ...],
    rows_per_chunk: int,
    ranks: list[int],
    dtype: torch.dtype,
) -> list[list[torch.Tensor]]:
    """For each input, the k-th largest magnitudes of its whole task vector `|theta_i - base|` for every k in
    `ranks` (TIES' and breadcrumbs' thresholds), found by passes over row blocks (:class:`KthLargest`), so no task
    vector is ever held whole. A tensor that fits in one block is read once; a larger one once per pass (2 for
    float32), the base once per block for all inputs."""
    num_rows = shape[0] if len(shape) > 0 else 1
    selectors = [KthLargest(ranks, math.prod(shape), dtype) for _ in readers]
    cached: list[torch.Tensor] | None = None
    while not selectors[0].done:
        for start in range(0, num_rows, rows_per_chunk):
            end = min(num_rows, start + rows_per_chunk)
            magnitudes = cached
            if magnitudes is None:
                base = block(base_reader, start, end)
                magnitudes = [block(reader, start, end).sub_(base).abs_() for reader in readers]
                del base
                if end - start == num_rows:  # one block: keep it for the next pass instead of reading it again
                    cached = magnitudes
            for selector, values in zip(selectors, magnitudes, strict=True):
                selector.update(values)
            del magnitudes
        for selector in selectors:
            selector.finish_pass()
    return [selector.values() for selector in selectors]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints on disk: reading tensors (or row blocks of them), writing shards as blocks arrive
# ----------------------------------------------------------------------------------------------------------------


class _SafetensorsCheckpoint:
    """Tensor names, shapes and dtypes of a safetensors checkpoint folder, and reads of row blocks.

    Reads use plain file reads into freshly allocated tensors rather than a memory map, so the bytes of a
    tensor that was merged do not stay resident in the process.
    """

    def __init__(self, folder: str | os.PathLike, role: str):
        self.folder = Path(folder)
        self.role = role
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{role} {str(folder)!r} is not a folder; pass a checkpoint folder.")
        file_names = None
        if not (self.folder / "model.safetensors.index.json").is_file():
            file_names = sorted(
                path.name for path in self.folder.glob("*.safetensors") if not path.name.startswith("adapter")
            )
            if not file_names:
                raise FileNotFoundError(
                    f"{role} {str(folder)!r} has no *.safetensors weights (pickle .bin weights are not merged: "
                    "convert them with `model.save_pretrained(path, safe_serialization=True)`)."
                )
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._offsets: dict[str, int] = {}
        # Every header is checked against its file before any tensor is read (a damaged input is named up front).
        for file_name, (header, data_start) in check_safetensors_checkpoint(self.folder, file_names).items():
            for tensor_name, entry in header.items():
                if tensor_name == "__metadata__":
                    continue
                if entry["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"tensor {tensor_name!r} in {str(self.folder / file_name)!r} has dtype {entry['dtype']}, "
                        f"which merges do not handle (supported: {', '.join(_SAFETENSORS_DTYPES)})."
                    )
                self.file_of[tensor_name] = file_name
                self.shapes[tensor_name] = tuple(entry["shape"])
                self.dtypes[tensor_name] = _SAFETENSORS_DTYPES[entry["dtype"]]
                self._offsets[tensor_name] = data_start + entry["data_offsets"][0]
        config_path = self.folder / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def reader(self, name: str) -> RowReader:
        shape = self.shapes[name]
        dtype = getattr(torch, self.dtypes[name])

        def read(start: int, end: int) -> torch.Tensor:
            rows = shape[1:] if len(shape) > 0 else ()
            row_shape = (end - start, *rows) if len(shape) > 0 else ()
            tensor = torch.empty(row_shape, dtype=dtype)
            row_bytes = math.prod(rows) * tensor.element_size() if len(shape) > 0 else 0
            with open(self.folder / self.file_of[name], "rb") as handle:
                handle.seek(self._offsets[name] + start * row_bytes)
                if tensor.numel():
                    buffer = tensor.reshape(-1).view(torch.uint8).numpy()
                    if handle.readinto(buffer) != buffer.nbytes:
                        raise ModelLoadingError(
                            f"safetensors file {handle.name!r} ended early while tensor {name!r} was read: it was "
                            "truncated during the merge. Restore it and rerun."
                        )
            return tensor

        return read

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.reader(name)(0, shape[0] if shape else 1)


class _ShardWriter:
    """Writes one safetensors file whose tensor list is known up front, block by block, without buffering.

    The safetensors format is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte offsets, then the raw bytes in header order; knowing every shape before merging lets the
    header be written first and each merged block be appended (and freed) as soon as it is computed.
    """

    _CODES = {value: key for key, value in _SAFETENSORS_DTYPES.items()}

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._sizes = []
        for name, dtype, shape in entries:
            num_bytes = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            header[name] = {
                "dtype": self._CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + num_bytes],
            }
            self._sizes.append(num_bytes)
            offset += num_bytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.path = path
        self.total_bytes = offset
        self._entries = entries
        self._position = -1
        self._written = 0
        self._handle = None
        with self._naming_the_file():
            self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._write(struct.pack("<Q", len(encoded)))
            self._write(encoded)

    @contextlib.contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        """Give OSErrors of writes (a full disk reports none) this shard's path, so the caller can name it."""
        try:
            yield
        except OSError as error:
            error.filename = error.filename or str(self.path)
            if self._handle is not None:
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    self._handle.close()
            raise

    def _write(self, data: Any) -> None:
        self._handle.write(data)

    def begin(self, name: str) -> None:
        self._finish_current()
        self._position += 1
        if self._position >= len(self._entries) or self._entries[self._position][0] != name:
            raise RuntimeError(f"shard {self.path.name}: {name!r} written out of order.")
        self._written = 0

    def write_block(self, tensor: torch.Tensor) -> None:
        expected_dtype = getattr(torch, self._entries[self._position][1])
        if tensor.dtype != expected_dtype:
            raise RuntimeError(f"shard {self.path.name}: got {tensor.dtype}, expected {expected_dtype}.")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            with self._naming_the_file():
                self._write(flat.view(torch.uint8).numpy().data)
        self._written += flat.numel() * flat.element_size()

    def _finish_current(self) -> None:
        if self._position >= 0 and self._written != self._sizes[self._position]:
            name = self._entries[self._position][0]
            raise RuntimeError(
                f"shard {self.path.name}: {name!r} got {self._written} of {self._sizes[self._position]} bytes."
            )

    def close(self) -> None:
        self._finish_current()
        if self._position != len(self._entries) - 1:
            raise RuntimeError(f"shard {self.path.name} got {self._position + 1} of {len(self._entries)} tensors.")
        with self._naming_the_file():
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; pass bytes (int) or a string such as '5GB'.")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match.group(1)) * units[match.group(2)])


def _plan_shards(
    names: list[str], dtypes: dict[str, str], shapes: dict[str, tuple[int, ...]], max_shard_bytes: int
) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        num_bytes = math.prod(shapes[name]) * torch.empty((), dtype=getattr(torch, dtypes[name])).element_size()
        if shards[-1] and size + num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += num_bytes
    return shards
