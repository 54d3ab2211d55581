"""Small shared helpers: atomic writes and output folders, cache folders, dtype parsing."""

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


def check_output_dir(
    output_dir: str | os.PathLike | None,
    overwrite: bool,
    fix: str = "pass overwrite=True (CLI: --overwrite_output_dir) to replace it, or choose another folder.",
    name: str = "output folder",
) -> None:
    """Refuse an existing `output_dir` unless `overwrite`, before anything expensive happens.

    The error reads `{name} {str(output_dir)!r} already exists; {fix}`: each caller words the fix in its own terms
    (a keyword argument of the Python API, a command-line flag). An unset (`None` or empty) `output_dir` passes.
    """
    if output_dir and os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{name} {str(output_dir)!r} already exists; {fix}")


@contextlib.contextmanager
def atomic_directory(
    final_dir: str | os.PathLike, overwrite: bool = False, *, keep_name: bool = False, all_ranks: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder next to `final_dir`; on success rename it into place.

    Nothing half-written is ever visible at `final_dir`: an exception (or a killed process) leaves at most a
    hidden `.tmp-*` sibling, which the next successful call does not see. With `overwrite=True` an existing
    `final_dir` is replaced only after the new one is complete.

    Args:
        keep_name (`bool`, *optional*, defaults to `False`):
            Yield `.tmp-NAME-*/NAME` instead of the `.tmp-NAME-*` folder itself, so files that record their
            folder's name (model cards) are right.
        all_ranks (`bool`, *optional*, defaults to `False`):
            Every rank of a launched run (`WORLD_SIZE` > 1) enters the block and gets the same staging folder; only
            the main process creates, renames and removes it, between barriers. In a single process it changes
            nothing.
    """
    final_dir = Path(final_dir)
    check_output_dir(final_dir, overwrite)
    state = None
    if all_ranks and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
    is_main = state is None or state.is_main_process
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        stage_root = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    else:  # one name on every rank: derived from the launcher's rendezvous
        tag = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "run")
        stage_root = final_dir.parent / f".tmp-{final_dir.name}-{tag}"
        if is_main:
            shutil.rmtree(stage_root, ignore_errors=True)
            stage_root.mkdir(parents=True)
        state.wait_for_everyone()
    stage = stage_root / final_dir.name if keep_name else stage_root
    stage.mkdir(exist_ok=True)
    try:
        yield stage
    except BaseException:
        if is_main:
            shutil.rmtree(stage_root, ignore_errors=True)
        raise
    if state is not None:
        state.wait_for_everyone()
    if is_main:
        old_dir = None
        if final_dir.exists():
            old_dir = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final_dir, old_dir)
        os.replace(stage, final_dir)
        if keep_name:
            shutil.rmtree(stage_root, ignore_errors=True)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    if state is not None:
        state.wait_for_everyone()


@contextlib.contextmanager
def staged_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder that becomes `output_dir` only when the block succeeds (nothing partial is left behind).

    :func:`atomic_directory` with `keep_name` (the staging folder carries the final folder's NAME inside a hidden
    `.tmp-*` parent, so model cards name the right folder) and `all_ranks` (it works under several processes: every
    rank uses the same staging folder, only the main process creates and renames it). An existing `output_dir` is
    refused in the command line's words. What the recipes and the demo write into.
    """
    check_output_dir(
        Path(output_dir), overwrite, fix="pass --overwrite_output_dir to replace it, or choose another output_dir."
    )
    # Checked just above in the command line's words; from here on an existing folder is replaced on success.
    with atomic_directory(output_dir, overwrite=True, keep_name=True, all_ranks=True) as stage:
        yield stage


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
