"""Checkpoints of `DistillationTrainer` that a full disk or a kill does not spoil: a save that fails leaves no half
`checkpoint-N` and says which folder and why; `resume_from_checkpoint=True` resumes the last complete checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..logging_utils import get_logger
from ..utils import _resume_request, add_note, is_complete_checkpoint, last_complete_checkpoint

logger = get_logger(__name__)

# How a full disk shows through the writers a checkpoint uses: Python (ENOSPC), torch's zip writer ("unexpected pos",
# "file write failed") and safetensors (its Rust error names the OS error).
_OUT_OF_SPACE_MARKERS = ("no space left on device", "unexpected pos", "file write failed", "storagefull")


def _resume_target(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """`resume_from_checkpoint` as `Trainer.train` takes it, with `True` turned into the last *complete* checkpoint of
    `output_dir`; skipped incomplete ones (a save cut short) are named in a warning. `transformers` would pick the
    highest `checkpoint-N` and fail on it."""
    resume = _resume_request(resume_from_checkpoint)
    if resume is not True:
        return resume
    last = last_complete_checkpoint(output_dir)
    last_step = int(last.name.split("-")[1]) if last is not None else -1
    folder = Path(output_dir)
    incomplete = sorted(
        (int(match.group(1)), entry.name)
        for entry in (folder.iterdir() if folder.is_dir() else ())
        if (match := re.fullmatch(r"checkpoint-(\d+)", entry.name))
        and entry.is_dir()
        and int(match.group(1)) > last_step
    )
    skipped = ", ".join(name for _, name in incomplete)
    if last is None:
        found = f" (incomplete: {skipped})" if skipped else ""
        raise ValueError(
            f"resume_from_checkpoint=True, but output_dir {str(output_dir)!r} holds no complete checkpoint{found}; "
            "pass a checkpoint-N folder, or resume_from_checkpoint=None to start afresh."
        )
    if skipped:
        logger.warning(
            f"Resuming from {last.name} in {str(output_dir)!r}: skipped the incomplete {skipped} (no readable "
            "trainer_state.json, which a checkpoint writes last: a save cut short by a kill or a full disk). "
            "Training saves those steps again."
        )
    else:
        logger.info(f"Resuming from {last}.")
    return str(last)


def _is_out_of_space(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(error).lower() for marker in _OUT_OF_SPACE_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_space(folder: str) -> str:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free there now"
    except OSError:
        return "free space unknown"


def _failed_checkpoint_error(error: Exception, checkpoint_dir: str, run_dir: str, remove: bool) -> Exception:
    """The error to raise for a checkpoint save that failed; first removes the half-written folder (`remove`: the
    main process). A full disk becomes `OSError(ENOSPC)` naming the folder; other errors get a note naming it."""
    complete = is_complete_checkpoint(checkpoint_dir)
    if complete:
        what = "the checkpoint itself was written completely"
    elif remove and os.path.isdir(checkpoint_dir):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        what = "the half-written folder was removed"
    else:
        what = "the folder is incomplete"
    last = last_complete_checkpoint(run_dir)
    kept = f"; {last.name} is intact, and train(resume_from_checkpoint=True) continues from it" if last else ""
    if _is_out_of_space(error):
        return OSError(
            errno.ENOSPC,
            f"no space left on device while saving checkpoint {str(checkpoint_dir)!r} ({_free_space(run_dir)}); "
            f"{what}{kept}. Free some space, lower save_total_limit, or point output_dir at a larger disk. "
            f"({type(error).__name__}: {error})",
        )
    add_note(error, f"while saving checkpoint {str(checkpoint_dir)!r}: {what}{kept}.")
    return error


@contextlib.contextmanager
def _no_half_checkpoint(checkpoint_dir: str, run_dir: str, is_main_process: bool) -> Iterator[None]:
    """Around one checkpoint save: an exception leaves no half-written `checkpoint_dir` (the main process removes it)
    and becomes an error that names it (:func:`_failed_checkpoint_error`)."""
    if is_main_process:  # the state is written last: without it, a folder being written again counts as incomplete
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(checkpoint_dir, "trainer_state.json"))
    try:
        yield
    except Exception as error:
        failure = _failed_checkpoint_error(error, checkpoint_dir, run_dir, remove=is_main_process)
        if failure is error:
            raise
        raise failure from error


def _write_distilled_card(trainer: Any, output_dir: str) -> None:
    """The final save's model card: teachers (with revisions: a cache's, a server's report), hyperparameters."""
    from ..hub.outputs import write_output_metadata

    teachers = []
    if hasattr(trainer, "card_teachers"):  # several teachers (MultiTeacherDistillationTrainer): each with its role
        teachers = trainer.card_teachers()
    elif trainer.teacher_name_or_path:
        revision = trainer.args.teacher_revision
        if trainer.teacher_cache is not None:
            revision = trainer.teacher_cache.manifest.get("teacher_revision") or trainer.teacher_cache.manifest.get(
                "revision"
            )
        if trainer.served_teacher is not None:  # as the server reports them
            revision = trainer.served_teacher.model_info.get("revision")
        teachers.append({"name_or_path": trainer.teacher_name_or_path, "revision": revision})
    else:
        teachers.append({"name_or_path": type(trainer.teacher_model).__name__, "revision": None})
    hyperparameters = trainer.args.distillation_hyperparameters()
    if trainer.self_distillation:
        hyperparameters["self_distillation"] = "teacher = base model with adapters disabled"
    try:
        write_output_metadata(output_dir, "distilled", card={"teachers": teachers, "hyperparameters": hyperparameters})
    except (ValueError, OSError) as error:  # the weights are saved; a card problem must not lose the run
        logger.warning(f"Saved the model to {output_dir} but could not write its model card: {error}")
