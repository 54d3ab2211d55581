"""Small shared helpers: atomic writes and output folders, cache folders, dtype parsing, CPU features."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
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
        with _signals_held():
            _replace_directory(stage, final_dir)
            if keep_name:
                shutil.rmtree(stage_root, ignore_errors=True)
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


# Flags the training commands name in their messages (recipes/*.py and `hf-interop distill|adapt` share them).
RESUME_FLAG = "--resume_from_checkpoint true"
OVERWRITE_FLAG = "--overwrite_output_dir"


def incomplete_run_dir(output_dir: str | os.PathLike) -> Path:
    """Where a training run stages `output_dir`: `PARENT/.incomplete-NAME/NAME`, the same on every rank and rerun.

    The staging folder carries the final NAME (model cards record it) inside a hidden parent, so a half-trained run
    is never taken for a finished one; its `checkpoint-N` folders are what `--resume_from_checkpoint true` continues.
    """
    output_dir = Path(output_dir)
    return output_dir.parent / f".incomplete-{output_dir.name}" / output_dir.name


def last_complete_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` subfolder of `folder` with the highest N that a rerun can resume, or `None`.

    `Trainer` writes `trainer_state.json` last, after the weights, optimizer, scheduler and RNG states, so a save that
    a kill cut short has none (or a truncated one) and is skipped. `transformers.trainer_utils.get_last_checkpoint`
    would pick it and fail on it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", entry.name)
        if match and entry.is_dir():
            steps.append((int(match.group(1)), entry))
    for _, checkpoint in sorted(steps, reverse=True):
        if is_complete_checkpoint(checkpoint):
            return checkpoint
    return None


def is_complete_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """Whether a `checkpoint-N` folder holds a readable `trainer_state.json`, which `Trainer` writes last."""
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


@dataclasses.dataclass
class ResumableRun:
    """What :func:`resumable_output_dir` yields: the folder to train in and the checkpoint to resume (or `None`)."""

    folder: Path
    resume_from_checkpoint: str | None


def _resume_request(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as given (`"true"`, `"false"`, a path, a bool, `None`) -> `True`, a path or `None`."""
    if isinstance(value, str) and value.strip().lower() in ("", "false", "no", "none"):
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "yes"):
        return True
    if value is False:
        return None
    if value is True or value is None:
        return value
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume_from_checkpoint {str(value)!r} is not a folder; pass a checkpoint-N folder, or true for the last "
            "checkpoint of the interrupted run."
        )
    if not (path / "trainer_state.json").is_file():
        raise ValueError(
            f"resume_from_checkpoint {str(value)!r} holds no trainer_state.json, so it is not a complete Trainer "
            "checkpoint (a save cut short, or a final model folder); pass a checkpoint-N folder, or true."
        )
    return str(value)


def _resume_hint(stage: Path, checkpoint: Path) -> str:
    return (
        f"checkpoints in {str(stage)!r} (last: {checkpoint.name}); rerun the same command with {RESUME_FLAG} to "
        f"continue from {checkpoint.name}, or with {OVERWRITE_FLAG} to start afresh"
    )


@contextlib.contextmanager
def resumable_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, resume_from_checkpoint: str | bool | None = None
) -> Iterator[ResumableRun]:
    """Train in :func:`incomplete_run_dir` and rename it to `output_dir` (checkpoints inside) only when the block succeeds.

    Nothing trained is lost: an exception, SIGTERM (KeyboardInterrupt) or SIGKILL leaves the staging folder with its
    `checkpoint-N` folders; the exception gets a note naming the folder, the last complete checkpoint and the two
    flags. A rerun with neither flag is refused (`FileExistsError`, before anything loads) instead of deleting them;
    `resume_from_checkpoint=True` (or `"true"`) resumes the last complete one, a path resumes that checkpoint;
    `overwrite=True` without resuming starts afresh (and replaces an existing `output_dir` on success). A staging
    folder without a complete checkpoint holds nothing worth keeping and is cleared. Under several processes
    (`WORLD_SIZE` > 1) every rank gets the same folder and makes the same decisions; only the main process deletes
    and renames, between barriers.
    """
    final_dir = Path(output_dir)
    stage = incomplete_run_dir(final_dir)
    resume = _resume_request(resume_from_checkpoint)
    check_output_dir(final_dir, overwrite, fix=f"pass {OVERWRITE_FLAG} to replace it, or choose another output_dir.")
    last = last_complete_checkpoint(stage)
    if last is not None and resume is None and not overwrite:
        raise FileExistsError(f"an interrupted run of {str(final_dir)!r} left {_resume_hint(stage, last)}.")
    if resume is True:
        resume = str(last) if last is not None else None  # nothing to resume yet: the first run of a requeued job
    clear_stage = resume is None and (last is None or overwrite)
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
    is_main = state is None or state.is_main_process
    if is_main:
        if clear_stage:
            shutil.rmtree(stage.parent, ignore_errors=True)
        stage.mkdir(parents=True, exist_ok=True)
    if state is not None:
        state.wait_for_everyone()
    try:
        yield ResumableRun(folder=stage, resume_from_checkpoint=resume)
    except BaseException as error:
        kept = last_complete_checkpoint(stage)
        if kept is not None:
            add_note(error, f"kept {_resume_hint(stage, kept)}")
        elif is_main:
            shutil.rmtree(stage.parent, ignore_errors=True)
        raise
    if state is not None:
        state.wait_for_everyone()
    if is_main:
        with _signals_held():
            _replace_directory(stage, final_dir)
            shutil.rmtree(stage.parent, ignore_errors=True)
    if state is not None:
        state.wait_for_everyone()


def add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)` (Python 3.11+: shown under the traceback); on 3.10 the note is kept in `__notes__` too,
    where the command line reads it for its one-line message."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def _replace_directory(source: Path, final_dir: Path) -> None:
    """Rename `source` to `final_dir`, replacing an existing `final_dir` only once `source` is in place."""
    old_dir = None
    if final_dir.exists():
        old_dir = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final_dir, old_dir)
    os.replace(source, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a few renames, so a kill cannot fall between moving an old folder aside and moving
    the new one in (the signal is delivered right after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


# CPU flags that mean bfloat16 matrix multiplies run natively: x86 AVX-512 BF16 and AMX, ARM's BF16 extensions.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "svebf16")


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's feature flags, sorted: the first `flags` (x86) or `Features` (ARM) line of `/proc/cpuinfo`.

    `[]` where there is no such file (macOS, Windows) or line. Benchmarks record these beside their figures, since
    bfloat16 speed on a CPU depends on them (see :func:`cpu_has_native_bf16`).
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return sorted(set(value.split()))
    except OSError:
        pass
    return []


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (`avx512_bf16` / `amx_bf16` on x86, `bf16` on ARM); `None`
    when its flags cannot be read.

    Without them torch emulates bfloat16 matmuls: `benchmarks/bench_trainer.py`'s bf16-autocast training step ran
    about 15x slower than float32 on an AMD EPYC without `avx512_bf16`, and faster than float32 on one with it.
    """
    flags = cpu_flags(cpuinfo_path)
    if not flags:
        return None
    return any(flag in NATIVE_BF16_FLAGS for flag in flags)
