"""Weight-space fusion: merging checkpoints of one architecture, greedy soups, and LoRA adapter combinations.

Methods (the names mergekit uses):

- `linear`: weighted average, a model soup (https://huggingface.co/papers/2203.05482).
- `task_arithmetic`: base + sum_i w_i (theta_i - base) (https://huggingface.co/papers/2212.04089).
- `ties`: trim each task vector to its largest-magnitude `density` fraction, elect a sign per parameter, average
  the task vectors that agree with it (https://huggingface.co/papers/2306.01708).
- `dare_linear` / `dare_ties`: drop task-vector entries at random (keep probability `density`, seeded), rescale
  by 1/density, then combine as task arithmetic / TIES (https://huggingface.co/papers/2311.03099).
- `slerp`: spherical interpolation of two models, tensor by tensor.

The math lives in pure functions over tensors (:func:`merge_tensors`); :func:`merge_checkpoints` streams
safetensors files tensor by tensor and writes the output shards as it goes, so its peak memory is a few tensors,
not N models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..logging_utils import get_logger
from ..utils import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from peft import PeftModel

logger = get_logger(__name__)

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
METHODS_NEEDING_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
METHODS_USING_DENSITY = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5
LORA_COMBINATIONS = ("cat", "linear", "svd", "ties")
# Files of a checkpoint folder that are not weights and travel with a merge (tokenizer, chat template, configs).
_COPIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|"
    r"merges\.txt|chat_template\.(jinja|json)|.*\.model)$"
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
# The math: pure functions over tensors
# ----------------------------------------------------------------------------------------------------------------


def trim_threshold(delta: torch.Tensor, density: float, magnitudes_given: bool = False) -> torch.Tensor:
    """Magnitude of the `ceil(density * numel)`-th largest entry of `delta` (TIES keeps entries at or above it).

    With `magnitudes_given=True`, `delta` already holds absolute values (saves a copy of a large tensor).
    """

    keep = max(1, math.ceil(density * delta.numel()))
    magnitudes = (delta if magnitudes_given else delta.abs()).reshape(-1)
    return _kth_largest(magnitudes, keep)


def _kth_largest(values: torch.Tensor, k: int, sample_size: int = 2**16, margin: float = 0.01) -> torch.Tensor:
    """Exact k-th largest entry of a 1-D tensor without sorting (or copying) all of it.

    A seeded random sample brackets the answer between two values; two counting passes confirm the bracket, and
    only the entries inside it (about `2 * margin` of the tensor) go through `kthvalue`. If the bracket misses
    (very unlikely), the whole tensor goes through `kthvalue`.
    """
    import torch

    count = values.numel()
    if count <= 4 * sample_size:
        return torch.kthvalue(values, count - k + 1).values
    generator = torch.Generator().manual_seed(0)
    sample = values[torch.randint(0, count, (sample_size,), generator=generator)].sort().values
    below = (count - k) / count  # fraction of entries below the answer
    low_index = math.floor((below - margin) * sample_size)
    high_index = math.ceil((below + margin) * sample_size)
    low = sample[low_index] if low_index >= 0 else values.new_tensor(-math.inf)
    high = sample[high_index] if high_index < sample_size else values.new_tensor(math.inf)
    num_above_high = int((values > high).sum())
    if int((values >= low).sum()) >= k > num_above_high:
        inside = values[(values >= low) & (values <= high)]
        rank = k - num_above_high  # the answer's rank from the top among the entries inside the bracket
        return torch.kthvalue(inside, inside.numel() - rank + 1).values
    return torch.kthvalue(values, count - k + 1).values


def magnitude_trim(delta: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the `ceil(density * numel)` entries of largest magnitude, zero the rest (TIES' trim step).

    Entries tied with the smallest kept magnitude are all kept. `threshold` (from :func:`trim_threshold` on the
    whole tensor) lets a slice of a tensor be trimmed exactly as the whole tensor would be.
    """
    import torch

    if density >= 1.0:
        return delta
    if threshold is None:
        threshold = trim_threshold(delta, density)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def dare_keep_mask(
    shape: Sequence[int], density: float, seed: int, tensor_name: str, model_index: int
) -> torch.Tensor:
    """Bernoulli(density) keep mask of DARE, seeded by `(seed, tensor_name, model_index)`.

    The seed depends on the tensor's name, not on the order tensors are processed in, so a streamed merge and an
    in-memory merge drop exactly the same entries.
    """
    import torch

    digest = hashlib.sha256(f"{seed}:{tensor_name}:{model_index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(tuple(shape), generator=generator) < density


def _disjoint_merge(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: average, per entry, the weighted deltas that agree with the sign of
    their weighted sum; entries where no delta agrees become 0."""
    import torch

    numerator = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        numerator += weight * delta
    elected_sign = torch.sign(numerator)
    numerator.zero_()
    denominator = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        agrees = (torch.sign(delta) == elected_sign) & (elected_sign != 0)
        numerator += torch.where(agrees, weight * delta, 0.0)
        denominator += agrees * weight
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)


def slerp_coefficients(
    t: float, dot: float, first_norm: float, second_norm: float, dot_threshold: float = 0.9995
) -> tuple[float, float]:
    """`(c0, c1)` with slerp(t, a, b) = c0 * a + c1 * b, from the dot product and norms of a and b.

    Linear interpolation `(1 - t, t)` when either vector is zero or they are (anti)parallel (|cos| > threshold).
    """
    if first_norm == 0 or second_norm == 0:
        return 1 - t, t
    cosine = max(-1.0, min(1.0, dot / (first_norm * second_norm)))
    if abs(cosine) > dot_threshold:
        return 1 - t, t
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    return math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp(t: float, first: torch.Tensor, second: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors; linear when they are (anti)parallel."""
    first_flat, second_flat = first.double().flatten(), second.double().flatten()
    c0, c1 = slerp_coefficients(
        t, float(first_flat @ second_flat), float(first_flat.norm()), float(second_flat.norm()), dot_threshold
    )
    return c0 * first + c1 * second


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    density: float = DEFAULT_DENSITY,
    slerp_t: float = 0.5,
    dare_masks: Sequence[torch.Tensor] | None = None,
    trim_thresholds: Sequence[torch.Tensor] | None = None,
    slerp_weights: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Merge one tensor (or one slice of it) across checkpoints, in the dtype of `tensors`.

    Args:
        method (`str`): one of `MERGE_METHODS`.
        tensors (`list[torch.Tensor]`): the tensor from each checkpoint (same shape).
        weights (`list[float]`): one per tensor. `linear` normalises them to sum to 1; `task_arithmetic` and
            `dare_linear` scale each task vector by its weight; `ties`/`dare_ties` use them in the sign election
            and the disjoint weighted mean.
        base (`torch.Tensor`, *optional*): the base model's tensor (task-vector methods).
        density (`float`, *optional*, defaults to 0.5): kept fraction (`ties`) or keep probability (`dare_*`).
        slerp_t (`float`, *optional*, defaults to 0.5): interpolation point of `slerp` (0 gives the first tensor).
        dare_masks (`list[torch.Tensor]`, *optional*): keep masks of `dare_*`, one per tensor.
        trim_thresholds (`list[torch.Tensor]`, *optional*): per-tensor TIES thresholds computed on whole tensors
            (:func:`trim_threshold`), when `tensors` are slices.
        slerp_weights (`tuple[float, float]`, *optional*): :func:`slerp_coefficients` of whole tensors, when
            `tensors` are slices.
    """
    if method == "linear":
        total = sum(weights)
        merged = (weights[0] / total) * tensors[0]
        for weight, tensor in zip(weights[1:], tensors[1:], strict=True):
            merged += (weight / total) * tensor
        return merged
    if method == "slerp":
        if slerp_weights is None:
            return slerp(slerp_t, tensors[0], tensors[1])
        return slerp_weights[0] * tensors[0] + slerp_weights[1] * tensors[1]
    if base is None:
        raise ValueError(f"merge method {method!r} needs the base model's tensor.")
    deltas = [tensor - base for tensor in tensors]
    if method in ("dare_linear", "dare_ties"):
        if dare_masks is None:
            raise ValueError(f"merge method {method!r} needs dare_masks (see dare_keep_mask).")
        deltas = [delta * mask / density for delta, mask in zip(deltas, dare_masks, strict=True)]
    if method in ("task_arithmetic", "dare_linear"):
        merged = base.clone()
        for weight, delta in zip(weights, deltas, strict=True):
            merged += weight * delta
        return merged
    if method == "ties":
        thresholds = trim_thresholds or [None] * len(deltas)
        deltas = [
            magnitude_trim(delta, density, threshold) for delta, threshold in zip(deltas, thresholds, strict=True)
        ]
    if method in ("ties", "dare_ties"):
        return base + _disjoint_merge(deltas, list(weights))
    raise ValueError(f"method {method!r} is not one of {list(MERGE_METHODS)}.")


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
) -> None:
    """Merge tensor `name` block of rows by block of rows, passing each merged block (input dtype) to `emit`.

    `readers` must return fresh tensors (they are modified in place).

    Whole-tensor quantities are computed first: TIES thresholds (one input and the base at a time), the SLERP
    angle (accumulated over blocks) and DARE masks (seeded per tensor name), so block-wise results equal
    whole-tensor results.
    """
    import torch

    num_rows = shape[0] if len(shape) > 0 else 1
    row_elements = max(1, math.prod(shape[1:])) if len(shape) > 0 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_elements)
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

    thresholds = None
    if method == "ties" and density < 1.0:
        base_full = block(base_reader, 0, num_rows)
        thresholds = []
        for reader in readers:  # one whole input at a time; the delta's magnitudes are taken in place
            magnitudes = block(reader, 0, num_rows).sub_(base_full).abs_()
            thresholds.append(trim_threshold(magnitudes, density, magnitudes_given=True))
            del magnitudes
        del base_full
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
        )
        emit(merged.to(output_dtype))


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
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        else:
            files = sorted(
                path.name for path in self.folder.glob("*.safetensors") if not path.name.startswith("adapter")
            )
        if not files:
            raise FileNotFoundError(
                f"{role} {str(folder)!r} has no *.safetensors weights (pickle .bin weights are not merged: convert "
                "them with `model.save_pretrained(path, safe_serialization=True)`)."
            )
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._offsets: dict[str, int] = {}
        for file_name in files:
            with open(self.folder / file_name, "rb") as handle:
                (header_length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_length))
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
                self._offsets[tensor_name] = 8 + header_length + entry["data_offsets"][0]
        config_path = self.folder / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def reader(self, name: str) -> RowReader:
        import torch

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
                        raise OSError(f"{str(self.folder)!r} ended early while reading tensor {name!r}.")
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
        import torch

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
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)

    def begin(self, name: str) -> None:
        self._finish_current()
        self._position += 1
        if self._position >= len(self._entries) or self._entries[self._position][0] != name:
            raise RuntimeError(f"shard {self.path.name}: {name!r} written out of order.")
        self._written = 0

    def write_block(self, tensor: torch.Tensor) -> None:
        import torch

        expected_dtype = getattr(torch, self._entries[self._position][1])
        if tensor.dtype != expected_dtype:
            raise RuntimeError(f"shard {self.path.name}: got {tensor.dtype}, expected {expected_dtype}.")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._handle.write(flat.view(torch.uint8).numpy().data)
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
    import torch

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


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------------


def _check_method_arguments(
    method: str,
    num_checkpoints: int,
    weights: Sequence[float] | None,
    base: Any,
    density: float | None,
    slerp_t: float,
) -> tuple[list[float], float]:
    """Validated weights and density; raises a `ValueError` naming the argument, the value and the fix."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is unknown; use one of {', '.join(MERGE_METHODS)}.")
    if method == "slerp":
        if num_checkpoints != 2:
            raise ValueError(
                f"slerp interpolates exactly two models, got {num_checkpoints} checkpoints; pass two, or use "
                "method='linear' for more."
            )
        if base is not None:
            raise ValueError("slerp interpolates its two checkpoints and takes no base; leave base out.")
        if not isinstance(slerp_t, (int, float)) or not 0.0 <= slerp_t <= 1.0:
            raise ValueError(f"slerp_t={slerp_t!r} must be in [0, 1] (0 gives the first model, 1 the second).")
    if method in METHODS_NEEDING_BASE and base is None:
        raise ValueError(
            f"merge method {method!r} works on task vectors (checkpoint - base) and needs base=<the model the "
            "checkpoints were fine-tuned from>; use method='linear' to average without a base."
        )
    if method == "linear" and num_checkpoints < 2:
        raise ValueError(f"method='linear' averages models and needs at least 2 checkpoints, got {num_checkpoints}.")
    if num_checkpoints < 1:
        raise ValueError("checkpoints is empty; pass the checkpoint folders to merge.")
    if weights is None:
        weights = [1.0] * num_checkpoints
    else:
        weights = list(weights)
        if len(weights) != num_checkpoints:
            raise ValueError(
                f"weights has {len(weights)} values for {num_checkpoints} checkpoints; pass one weight per "
                "checkpoint (or leave weights out for equal weights)."
            )
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"weights={weights} must be finite numbers.")
        weights = [float(w) for w in weights]
    if method == "linear" and abs(sum(weights)) < 1e-12:
        raise ValueError(f"weights={weights} sum to 0, so the linear average is undefined; use weights summing to 1.")
    if method in ("ties", "dare_ties") and any(w <= 0 for w in weights):
        raise ValueError(
            f"weights={weights} must be positive for {method!r} (they weigh the sign election and the mean); "
            "use task_arithmetic or dare_linear to subtract a task vector."
        )
    if method in METHODS_USING_DENSITY:
        density = DEFAULT_DENSITY if density is None else density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(
                f"density={density!r} must be in (0, 1]: the fraction of each task vector kept (1 keeps all)."
            )
    elif density is not None:
        logger.warning(
            f"density={density} is ignored by method {method!r} (used by {', '.join(METHODS_USING_DENSITY)})."
        )
        density = DEFAULT_DENSITY
    else:
        density = DEFAULT_DENSITY
    return weights, float(density)


def _check_same_tensors(sources: list[_SafetensorsCheckpoint]) -> None:
    first = sources[0]
    for other in sources[1:]:
        missing = sorted(set(first.shapes) - set(other.shapes))
        extra = sorted(set(other.shapes) - set(first.shapes))
        if missing or extra:
            raise ValueError(
                f"{other.role} {str(other.folder)!r} and {first.role} {str(first.folder)!r} hold different tensors "
                f"(missing {missing[:3]}, extra {extra[:3]}); merges need checkpoints of one architecture."
            )
        for name, shape in first.shapes.items():
            if other.shapes[name] != shape:
                raise ValueError(
                    f"tensor {name!r} has shape {list(other.shapes[name])} in {other.role} {str(other.folder)!r} but "
                    f"{list(shape)} in {first.role} {str(first.folder)!r}; merges need checkpoints of one architecture."
                )
        for key in ("model_type", "architectures"):
            if first.config.get(key) != other.config.get(key):
                raise ValueError(
                    f"config {key} differs: {other.config.get(key)!r} in {str(other.folder)!r} vs "
                    f"{first.config.get(key)!r} in {str(first.folder)!r}; merges need checkpoints of one architecture."
                )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _check_same_tokenizers(sources: list[_SafetensorsCheckpoint]) -> Path | None:
    """Folder whose tokenizer the merge ships; raises if two checkpoints' tokenizers differ."""
    from transformers import AutoTokenizer

    with_tokenizer = [source for source in sources if _has_tokenizer(source.folder)]
    if not with_tokenizer:
        return None
    file_names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def file_digest(folder: Path) -> list[str | None]:
        return [
            hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else None
            for name in file_names
        ]

    # Byte-identical tokenizer files (the usual case for runs of one base) need no loading.
    first_digest = file_digest(with_tokenizer[0].folder)
    if all(file_digest(source.folder) == first_digest for source in with_tokenizer[1:]):
        return with_tokenizer[0].folder
    reference = None
    reference_folder = None
    for source in with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
        vocab = tokenizer.get_vocab()
        # A content hash (not the object) is kept, so only one tokenizer is in memory at a time.
        digest = hashlib.sha256(json.dumps([sorted(vocab.items()), tokenizer.all_special_tokens]).encode()).hexdigest()
        signature = (digest, len(vocab))
        del tokenizer, vocab
        if reference is None:
            reference, reference_folder = signature, source.folder
        elif signature != reference:
            detail = (
                f"vocabulary sizes {signature[1]} vs {reference[1]}"
                if signature[1] != reference[1]
                else "same size, different token ids or special tokens"
            )
            raise ValueError(
                f"the tokenizer of {source.role} {str(source.folder)!r} differs from that of "
                f"{str(reference_folder)!r} ({detail}); weight merges need checkpoints sharing one tokenizer."
            )
    return reference_folder


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def merge_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]],
    method: str,
    weights: Sequence[float] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    density: float | None = None,
    seed: int = 0,
    slerp_t: float = 0.5,
) -> dict[str, torch.Tensor]:
    """In-memory version of :func:`merge_checkpoints` over state dicts (same math, blocks and DARE masks)."""
    import torch

    weights, density = _check_method_arguments(method, len(state_dicts), weights, base, density, slerp_t)

    def reader_of(tensor: torch.Tensor) -> RowReader:
        # Fresh copies, like reads from disk: the merge works on its blocks in place.
        return lambda start, end: (tensor[start:end] if tensor.dim() > 0 else tensor).clone()

    merged = {}
    for name in state_dicts[0]:
        blocks: list[torch.Tensor] = []
        _merge_tensor_in_chunks(
            name,
            tuple(state_dicts[0][name].shape),
            [reader_of(state[name]) for state in state_dicts],
            None if base is None else reader_of(base[name]),
            method,
            weights,
            density,
            seed,
            slerp_t,
            blocks.append,
        )
        merged[name] = torch.cat(blocks) if state_dicts[0][name].dim() > 0 else blocks[0]
    return merged


def merge_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike,
    density: float | None = None,
    seed: int = 0,
    slerp_t: float = 0.5,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
) -> Path:
    """Merge checkpoints of one architecture in weight space, streaming tensor by tensor.

    Every argument, tensor name, shape and tokenizer is checked before any tensor is merged. Then each tensor is
    read from every checkpoint (safetensors, one tensor at a time), merged by :func:`merge_tensors` in float32
    (float64 for float64 checkpoints), cast back to its dtype and appended to the output shard at once, so peak
    memory is a few tensors rather than N models. The output folder gets the weights, the first checkpoint's
    config and generation config, the shared tokenizer, a `merged` model card and `hf_interop_lineage.json`
    (inputs and settings), all written to a temporary folder renamed into place when complete.

    Args:
        checkpoints (`list` of `str` or `os.PathLike`): checkpoint folders with safetensors weights.
        method (`str`, *optional*, defaults to `"linear"`): one of `linear`, `task_arithmetic`, `ties`,
            `dare_linear`, `dare_ties`, `slerp` (see the module docstring).
        weights (`list[float]`, *optional*): one per checkpoint; defaults to equal weights (1.0 each, which
            `linear` normalises to an average).
        base (`str` or `os.PathLike`, *optional*): the model the checkpoints were fine-tuned from; required by
            the task-vector methods.
        output_dir (`str` or `os.PathLike`): where the merged checkpoint is written.
        density (`float`, *optional*, defaults to 0.5): in (0, 1]; fraction of each task vector kept (`ties`) or
            keep probability (`dare_*`).
        seed (`int`, *optional*, defaults to 0): seed of DARE's random drops (results are reproducible).
        slerp_t (`float`, *optional*, defaults to 0.5): `slerp` interpolation point in [0, 1].
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): size of output shards.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over tensors.

    Returns:
        `Path` of the output folder.

    Example:

    ```python
    >>> merge_checkpoints(["run_a", "run_b"], "ties", base="base_model", density=0.3, output_dir="merged")
    ```
    """
    from tqdm.auto import tqdm

    if isinstance(checkpoints, (str, os.PathLike)):
        raise ValueError("checkpoints must be a list of checkpoint folders, not a single path.")
    checkpoints = [Path(path) for path in checkpoints]
    weights, density = _check_method_arguments(method, len(checkpoints), weights, base, density, slerp_t)
    output_dir = Path(output_dir)
    max_shard_bytes = _parse_size(max_shard_size)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    inputs = [*checkpoints, *([Path(base)] if base is not None else [])]
    if any(output_dir.resolve() == path.resolve() for path in inputs):
        raise ValueError(f"output_dir {str(output_dir)!r} is one of the inputs; write the merge to a new folder.")

    sources = [_SafetensorsCheckpoint(path, f"checkpoint {index}") for index, path in enumerate(checkpoints)]
    base_source = _SafetensorsCheckpoint(base, "base") if base is not None else None
    _check_same_tensors([*sources, *([base_source] if base_source else [])])
    tokenizer_folder = _check_same_tokenizers([*sources, *([base_source] if base_source else [])])

    first = sources[0]
    names = sorted(first.shapes)
    shards = _plan_shards(names, first.dtypes, first.shapes, max_shard_bytes)
    logger.info(
        f"Merging {len(checkpoints)} checkpoints with {method!r}: {len(names)} tensors, {len(shards)} shard(s)."
    )
    with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
        weight_map = {}
        total_size = 0
        progress = tqdm(total=len(names), desc=f"Merging ({method})", disable=not show_progress, leave=False)
        for shard_index, shard_names in enumerate(shards):
            file_name = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{shard_index + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            writer = _ShardWriter(
                tmp_dir / file_name, [(name, first.dtypes[name], first.shapes[name]) for name in shard_names]
            )
            for name in shard_names:
                writer.begin(name)
                _merge_tensor_in_chunks(
                    name,
                    first.shapes[name],
                    [source.reader(name) for source in sources],
                    base_source.reader(name) if base_source is not None else None,
                    method,
                    weights,
                    density,
                    seed,
                    slerp_t,
                    writer.write_block,
                )
                weight_map[name] = file_name
                progress.update(1)
            writer.close()
            total_size += writer.total_bytes
        progress.close()
        if len(shards) > 1:
            atomic_write_json(
                tmp_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": weight_map},
            )
        for file_name in ("config.json", "generation_config.json"):
            if (first.folder / file_name).is_file():
                shutil.copyfile(first.folder / file_name, tmp_dir / file_name)
        _copy_tokenizer_files(tokenizer_folder, tmp_dir)
        lineage = {
            "method": method,
            "checkpoints": [str(path) for path in checkpoints],
            "weights": weights,
            "base": None if base is None else str(base),
            "density": density if method in METHODS_USING_DENSITY else None,
            "seed": seed if method.startswith("dare") else None,
            "slerp_t": slerp_t if method == "slerp" else None,
        }
        _write_merge_lineage(tmp_dir, lineage)
        _write_merge_card(tmp_dir, output_dir.name, lineage)
    logger.info(f"Merged checkpoint written to {output_dir}")
    return output_dir


def _copy_tokenizer_files(source: Path | None, target: Path) -> None:
    if source is None:
        return
    for path in source.iterdir():
        if (
            path.is_file()
            and _COPIED_FILES.match(path.name)
            and path.name not in ("config.json", "generation_config.json")
        ):
            shutil.copyfile(path, target / path.name)


def _write_merge_lineage(folder: Path, lineage: dict[str, Any]) -> None:
    """`hf_interop_lineage.json`: the inputs (local paths, or hub ids with commit hashes) and the merge settings."""
    from ..hub import write_lineage_manifest

    members = [
        {"name_or_path": path, "weight": weight}
        for path, weight in zip(lineage["checkpoints"], lineage["weights"], strict=True)
    ]
    write_lineage_manifest(
        folder,
        kind="merged",
        base_model=lineage["base"],
        members=members,
        extra={key: value for key, value in lineage.items() if key not in ("checkpoints", "weights", "base")},
        strict=False,
    )


def _write_merge_card(folder: Path, model_name: str, lineage: dict[str, Any]) -> None:
    members = [
        {"name_or_path": path, "weight": weight}
        for path, weight in zip(lineage["checkpoints"], lineage["weights"], strict=True)
    ]
    hyperparameters = {key: lineage[key] for key in ("density", "seed", "slerp_t") if lineage[key] is not None}
    metadata: dict[str, Any] = {
        "members": members,
        "merge_method": lineage["method"],
        "hyperparameters": hyperparameters,
        "model_name": model_name,
        "lineage_manifest": "hf_interop_lineage.json",
    }
    if lineage["base"] is not None:
        metadata["base_model"] = lineage["base"]
    try:
        from ..model_card import write_model_card
    except ImportError:
        logger.warning("hf_interop.model_card is unavailable; the merge has no model card.")
        return
    write_model_card(folder, "merged", **metadata)


def greedy_soup(
    checkpoints: Sequence[str | os.PathLike],
    eval_dataset: Dataset,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Greedy model soup (https://huggingface.co/papers/2203.05482): add a checkpoint only if held-out loss improves.

    Checkpoints are ranked by their own held-out loss; the soup starts with the best one, and each next candidate
    is kept only if the uniform average of the soup plus the candidate has a strictly lower loss than the soup so
    far. The final soup is written with :func:`merge_checkpoints` (`linear`, equal weights) when `output_dir` is given.

    Args:
        checkpoints (`list` of `str` or `os.PathLike`): fine-tuned checkpoints of one architecture (one tokenizer).
        eval_dataset (`Dataset`): held-out rows with `input_ids` (e.g. :func:`hf_interop.pack_dataset`).
        output_dir (`str` or `os.PathLike`, *optional*): where to write the soup.
        batch_size (`int`, *optional*, defaults to 8), max_batches (`int`, *optional*): evaluation batching.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict` with `selected` (checkpoint paths in the soup), `losses` (each checkpoint's own loss), `soup_loss`,
        `history` (one entry per candidate: its soup loss and whether it was kept) and `output_dir`.
    """
    from safetensors.torch import load_file

    from ..evaluation import evaluate_perplexity
    from ..loading import load_causal_lm

    checkpoints = [Path(path) for path in checkpoints]
    if len(checkpoints) < 1:
        raise ValueError("greedy_soup needs at least one checkpoint.")
    if "input_ids" not in getattr(eval_dataset, "column_names", []):
        raise ValueError(
            "eval_dataset needs an `input_ids` column of held-out token blocks; pack text with "
            "hf_interop.pack_dataset(dataset, tokenizer)."
        )
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already exists; pass overwrite=True to replace it or choose another."
        )
    sources = [_SafetensorsCheckpoint(path, f"checkpoint {index}") for index, path in enumerate(checkpoints)]
    _check_same_tensors(sources)
    _check_same_tokenizers(sources)

    model, _ = load_causal_lm(checkpoints[0], load_tokenizer_too=False)

    def state_of(source: _SafetensorsCheckpoint) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for file_name in sorted(set(source.file_of.values())):
            state.update(load_file(str(source.folder / file_name)))
        return state

    def loss_of(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=False)
        return evaluate_perplexity(
            model, eval_dataset, batch_size=batch_size, max_batches=max_batches, show_progress=show_progress
        )["loss"]

    losses = {str(source.folder): loss_of(state_of(source)) for source in sources}
    order = sorted(range(len(sources)), key=lambda index: losses[str(sources[index].folder)])
    best = sources[order[0]]
    soup_sum = {name: tensor.double() for name, tensor in state_of(best).items()}
    selected = [best.folder]
    soup_loss = losses[str(best.folder)]
    history = [{"checkpoint": str(best.folder), "soup_loss": soup_loss, "kept": True}]
    for index in order[1:]:
        candidate = state_of(sources[index])
        count = len(selected) + 1
        trial = {
            name: ((soup_sum[name] + candidate[name].double()) / count).to(candidate[name].dtype) for name in soup_sum
        }
        trial_loss = loss_of(trial)
        kept = trial_loss < soup_loss
        history.append({"checkpoint": str(sources[index].folder), "soup_loss": trial_loss, "kept": kept})
        logger.info(f"greedy soup: {sources[index].folder} -> loss {trial_loss:.4f} ({'kept' if kept else 'skipped'})")
        if kept:
            for name in soup_sum:
                soup_sum[name] += candidate[name].double()
            selected.append(sources[index].folder)
            soup_loss = trial_loss
    if output_dir is not None:
        if len(selected) == 1:
            with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
                for path in selected[0].iterdir():
                    if path.is_file() and (path.suffix == ".safetensors" or _COPIED_FILES.match(path.name)):
                        shutil.copyfile(path, tmp_dir / path.name)
                _write_merge_lineage(
                    tmp_dir,
                    {"method": "greedy_soup", "checkpoints": [str(selected[0])], "weights": [1.0], "base": None},
                )
        else:
            merge_checkpoints(
                selected, "linear", output_dir=output_dir, overwrite=overwrite, show_progress=show_progress
            )
    return {
        "selected": [str(path) for path in selected],
        "losses": losses,
        "soup_loss": soup_loss,
        "history": history,
        "output_dir": None if output_dir is None else str(output_dir),
    }


def merge_lora_adapters(
    peft_model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float] | None = None,
    combination_type: str = "cat",
    adapter_name: str = "merged",
    density: float | None = None,
    svd_rank: int | None = None,
    set_active: bool = True,
) -> str:
    """Combine LoRA adapters of one base into a new adapter with PEFT's `add_weighted_adapter`, minus its pitfalls.

    - `cat` is exact: the new adapter's update is sum_i w_i * scaling_i * B_i A_i (its rank is the sum of ranks).
    - `svd` is the best rank-`svd_rank` approximation of that same sum.
    - `linear` combines A and B matrices separately, which adds cross terms between adapters (exact only for a
      single adapter); it needs equal ranks.
    - `ties` applies TIES to A and B separately (`density` kept); it needs equal ranks.

    Pitfalls handled here: PEFT keeps `use_rslora` of the first adapter for the merged one while already folding
    each adapter's scaling into its weights, which scales the merged update by sqrt(rank) too much; the merged
    adapter is given scaling 1 instead. Unequal ranks with `linear`/`ties` raise a clear error before any work
    (use `cat` or `svd`). An existing `adapter_name` raises instead of silently doing nothing. DoRA adapters are
    refused (their magnitude vectors are not combined). Negative weights subtract an adapter's update.

    Args:
        peft_model (`PeftModel`): model holding the adapters.
        adapters (`list[str]`): names of the adapters to combine.
        weights (`list[float]`, *optional*): one per adapter; defaults to 1.0 each (the updates add up).
        combination_type (`str`, *optional*, defaults to `"cat"`): one of `cat`, `linear`, `svd`, `ties`.
        adapter_name (`str`, *optional*, defaults to `"merged"`): name of the new adapter.
        density (`float`, *optional*): for `ties`, in (0, 1]; defaults to 0.5.
        svd_rank (`int`, *optional*): rank of the `svd` result; defaults to the largest input rank.
        set_active (`bool`, *optional*, defaults to `True`): make the new adapter the active one.

    Returns:
        `str`: the new adapter's name.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora_adapters needs a peft.PeftModel, got {type(peft_model).__name__}.")
    if combination_type not in LORA_COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not one of {list(LORA_COMBINATIONS)}.")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters is empty; pass the names of the adapters to combine.")
    unknown = [name for name in adapters if name not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"adapters {unknown} are not in the model (it has {sorted(peft_model.peft_config)}).")
    if adapter_name in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} already exists in the model; choose a new name (PEFT would otherwise "
            "silently keep the old adapter)."
        )
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights has {len(weights)} values for {len(adapters)} adapters; pass one per adapter.")
    configs = [peft_model.peft_config[name] for name in adapters]
    if any(getattr(config, "use_dora", False) for config in configs):
        raise ValueError("DoRA adapters cannot be combined (their magnitude vectors are not merged); use plain LoRA.")
    ranks = {name: config.r for name, config in zip(adapters, configs, strict=True)}
    if combination_type in ("linear", "ties") and len(adapters) > 1 and len(set(ranks.values())) > 1:
        raise ValueError(
            f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; use "
            "combination_type='cat' (exact, rank = sum of ranks) or 'svd' (rank svd_rank)."
        )
    if combination_type == "ties":
        density = DEFAULT_DENSITY if density is None else density
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} must be in (0, 1] for combination_type='ties'.")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights={weights} must be positive for combination_type='ties'.")

    peft_model.add_weighted_adapter(
        adapters=adapters,
        weights=weights,
        adapter_name=adapter_name,
        combination_type=combination_type,
        svd_rank=svd_rank,
        density=density,
    )
    merged_config = peft_model.peft_config[adapter_name]
    # add_weighted_adapter folds each source's scaling into the new weights and sets lora_alpha = r, so the new
    # adapter must apply scaling 1; with use_rslora inherited it would apply r / sqrt(r) = sqrt(r).
    merged_config.use_rslora = False
    merged_config.lora_alpha = merged_config.r
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.scaling[adapter_name] = 1.0
    if set_active:
        peft_model.set_adapter(adapter_name)
    return adapter_name
