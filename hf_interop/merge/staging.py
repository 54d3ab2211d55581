"""The output folder of a merge: staged in a folder that the live merge owns, cleaned on the next run when a killed
merge left one behind, and write errors (a full disk above all) that name the output and the fix.

A merge into `out` writes `.tmp-out-XXXXXXXX/` (:func:`hf_interop.utils.atomic_directory`) and renames it to `out`
only when it is complete, so `out` never looks complete before it is. While it writes, the merge holds an exclusive
lock on `.tmp-out-XXXXXXXX/.hf_interop_merge.lock`, which records its pid and host. The operating system drops the
lock when the process ends, however it ends (SIGKILL and power loss included, unlike a pid that can be reused), so:

- a staging folder of `out` whose lock the next merge into `out` can take is stale, and that merge removes it;
- one whose lock is held belongs to a merge still running, and the new merge is refused: two merges into one
  folder would replace each other's output. (Two merges started at the same instant can still both proceed.)
- one without a lock file (another tool's, or one left by a version of hf_interop without locks) is left alone,
  with a warning naming it.

`.old-out-*` folders hold a previous `out` moved aside by a run killed between its two renames; they are removed
once the new `out` is in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..logging_utils import get_logger
from ..utils import atomic_directory

try:
    import fcntl
except ImportError:  # Windows: staging folders are never judged stale, so never removed
    fcntl = None

logger = get_logger(__name__)

OWNER_FILE = ".hf_interop_merge.lock"


def _siblings(output_dir: Path, kind: str) -> list[Path]:
    """Staging (`kind="tmp"`, mkdtemp's 8 characters) or moved-aside (`"old"`, 8 hex digits) folders of exactly
    `output_dir`: the suffix has no dash, so `.tmp-out-v2-abcd1234` (of `out-v2`) never matches `out`."""
    suffix = r"[a-z0-9_]{8}" if kind == "tmp" else r"[0-9a-f]{8}"
    pattern = re.compile(rf"\.{kind}-{re.escape(output_dir.name)}-{suffix}")
    if not output_dir.parent.is_dir():
        return []
    return sorted(path for path in output_dir.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir())


def _folder_size(folder: Path) -> str:
    try:
        return _human(sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()))
    except OSError:  # removed or changed while being measured
        return "size unknown"


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def clear_stale_staging(output_dir: str | os.PathLike) -> None:
    """Remove the staging folders of `output_dir` left by killed merges; refuse when a merge is writing it now.

    Raises:
        `FileExistsError`: another live merge is writing `output_dir` (its pid, host and staging folder named).
    """
    output_dir = Path(output_dir)
    for folder in _siblings(output_dir, "tmp"):
        try:
            handle = open(folder / OWNER_FILE, "r+")  # noqa: SIM115 - closed below, after the removal
        except FileNotFoundError:
            logger.warning(
                f"{str(folder)!r} ({_folder_size(folder)}) looks like an unfinished write of {str(output_dir)!r} "
                "but records no hf_interop merge; it is left alone. Delete it if nothing is writing there."
            )
            continue
        with handle:
            if fcntl is None:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(handle.read() or "{}")
                except ValueError:
                    owner = {}
                raise FileExistsError(
                    f"another merge (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
                    f"{owner.get('started', '?')}) is writing {str(output_dir)!r} through {str(folder)!r}; wait for "
                    "it to finish, or choose another output_dir."
                ) from None
            size = _folder_size(folder)
            shutil.rmtree(folder, ignore_errors=True)  # while holding the lock: no other run can judge it live
        logger.warning(f"Removed {str(folder)!r} ({size}), left by a merge into {str(output_dir)!r} that was killed.")


@contextlib.contextmanager
def _owned(staging: Path) -> Iterator[None]:
    """Hold the lock of `staging` (and record who holds it) for as long as the merge writes into it."""
    lock_path = staging / OWNER_FILE
    with open(lock_path, "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.write(json.dumps(owner))
        handle.flush()
        try:
            yield
        finally:
            # Removed while still locked, so no other run ever sees this folder with a free lock.
            lock_path.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_output_file(path: Path) -> Iterator[None]:
    """Give the `OSError`s raised inside the block `path` (the file being written) when they name no file."""
    try:
        yield
    except OSError as error:
        error.filename = error.filename or str(path)
        raise


def _write_error(error: OSError, output_dir: Path, staging: Path | None, needed_bytes: int) -> OSError | None:
    """The error that names the output file and the fix, for an `OSError` raised while writing into `staging`;
    `None` for errors of something else (reading an input, say), which pass unchanged."""
    inside = None
    if staging is not None and error.filename:
        with contextlib.suppress(ValueError):
            inside = Path(os.fspath(error.filename)).relative_to(staging)
    disk_full = error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if inside is None and not disk_full:
        return None
    target = output_dir / inside if inside not in (None, Path(".")) else output_dir
    if disk_full:
        try:
            free = f"{_human(shutil.disk_usage(output_dir.parent).free)} are free"
        except OSError:
            free = "the free space is unknown"
        message = (
            f"no space left on device while writing {str(target)!r}: the merge into {str(output_dir)!r} needs about "
            f"{_human(needed_bytes)} and {free} there. Free space on that disk, or pass an output_dir on another, "
            "then rerun"
        )
    else:
        message = f"writing {str(target)!r} failed ({error.strerror or error}); fix that, then rerun"
    left = (
        f"{str(output_dir)!r} is unchanged" if output_dir.exists() else f"nothing was written at {str(output_dir)!r}"
    )
    return OSError(error.errno, f"{message}. The partial merge was removed and {left}.")


@contextlib.contextmanager
def merge_output_dir(output_dir: Path, overwrite: bool, needed_bytes: int, cleared: bool = False) -> Iterator[Path]:
    """Staging folder for a merge into `output_dir`, renamed into place when the block succeeds.

    Clears stale staging folders first (unless the caller did, `cleared=True`, before its expensive work; see the
    module docstring), owns the new one while the block runs, turns write errors into ones that name the output
    file (a full disk says so, with the space needed), and removes moved-aside previous outputs once the new one
    is in place.
    """
    if not cleared:
        clear_stale_staging(output_dir)
    staging = None
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as tmp_dir:
            staging = tmp_dir
            with _owned(tmp_dir):
                yield tmp_dir
    except OSError as error:
        report = _write_error(error, output_dir, staging, needed_bytes)
        if report is None:
            raise
        raise report from error
    for folder in _siblings(output_dir, "old"):
        shutil.rmtree(folder, ignore_errors=True)
