"""Small shared helpers: atomic writes, cache folders, dtype parsing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def hf_interop_cache_dir() -> Path:
    """Folder where hf_interop keeps converted assets (e.g. the default teacher).

    Order: `$HF_INTEROP_CACHE`, then `$HF_HOME/hf_interop`, then `$XDG_CACHE_HOME/huggingface/hf_interop`,
    then `~/.cache/huggingface/hf_interop`. Read at call time so tests and users can redirect it.
    """
    if os.environ.get("HF_INTEROP_CACHE"):
        return Path(os.environ["HF_INTEROP_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return Path(hf_home).expanduser() / "hf_interop"


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `final_dir`; on success rename it into place.

    Nothing half-written is ever visible at `final_dir`: an exception (or a killed process) leaves at most a
    hidden `.tmp-*` sibling, which the next successful call does not see. With `overwrite=True` an existing
    `final_dir` is replaced only after the new one is complete.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {str(final_dir)!r} already exists; pass overwrite=True (CLI: --overwrite_output_dir) "
            "to replace it, or choose another folder."
        )
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    old_dir = None
    if final_dir.exists():
        old_dir = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON version of :func:`atomic_write_text` (sorted keys, indented, trailing newline)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}


def resolve_dtype(dtype: Any) -> Any:
    """Turn `"bf16"`, `"bfloat16"`, `torch.bfloat16`, `"auto"` or `None` into what `from_pretrained` takes."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.lower()])
    raise ValueError(
        f"dtype {dtype!r} is not understood; use one of {sorted(set(_DTYPE_NAMES))}, 'auto', or a torch.dtype."
    )
