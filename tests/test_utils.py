"""Output folders: the one existence check and the one staging folder behind every atomic output."""

from __future__ import annotations

import pytest

from hf_interop.utils import atomic_directory, check_output_dir, staged_output_dir


def test_check_output_dir_words_the_fix_as_its_caller_asks(tmp_path):
    for unset_or_new in (None, "", tmp_path / "new"):
        check_output_dir(unset_or_new, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    with pytest.raises(FileExistsError) as error:
        check_output_dir(tmp_path, overwrite=False)
    assert str(error.value) == (
        f"output folder {str(tmp_path)!r} already exists; pass overwrite=True (CLI: --overwrite_output_dir) to "
        "replace it, or choose another folder."
    )
    with pytest.raises(FileExistsError) as error:
        check_output_dir(
            str(tmp_path), False, fix="pass overwrite=True to replace it or choose another.", name="output_dir"
        )
    assert (
        str(error.value)
        == f"output_dir {str(tmp_path)!r} already exists; pass overwrite=True to replace it or choose another."
    )


def test_atomic_directory_stages_in_a_hidden_sibling(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp_dir:
        assert tmp_dir.parent == tmp_path and tmp_dir.name.startswith(".tmp-out-") and not target.exists()
        (tmp_dir / "first").write_text("1")
    assert (target / "first").read_text() == "1"
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(CLI: --overwrite_output_dir\)"):
        with atomic_directory(target):
            pass
    # keep_name: the staging folder carries the final name, inside a hidden parent that goes away on success.
    with atomic_directory(target, overwrite=True, keep_name=True) as stage:
        assert stage.name == "out" and stage.parent.parent == tmp_path and stage.parent.name.startswith(".tmp-out-")
        (stage / "second").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["second"]
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True, keep_name=True) as stage:
            (stage / "half").write_text("3")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["second"]


def test_staged_output_dir_is_the_clis_and_names_the_flag(tmp_path):
    from hf_interop import cli

    assert cli.staged_output_dir is staged_output_dir
    (tmp_path / "run").mkdir()
    with pytest.raises(FileExistsError) as error:
        with staged_output_dir(tmp_path / "run"):
            pass
    assert str(error.value) == (
        f"output folder {str(tmp_path / 'run')!r} already exists; pass --overwrite_output_dir to replace it, or choose "
        "another output_dir."
    )


# ---------------------------------------------------------------------------------------------------------------
# resumable_output_dir: where training commands stage their output, kept with its checkpoints when a run fails
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint(folder, step: int, state: str = '{"global_step": 1}'):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (checkpoint / "trainer_state.json").write_text(state)
    return checkpoint


def test_last_complete_checkpoint_skips_saves_cut_short(tmp_path):
    from hf_interop.utils import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "absent") is None
    assert last_complete_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    ten = _checkpoint(tmp_path, 10)  # numeric order, not text order
    _checkpoint(tmp_path, 12, state=None)  # killed before trainer_state.json
    state = '{"global_step": 14, "log_history": []}'
    _checkpoint(tmp_path, 14, state=state[: len(state) // 2])  # killed while writing it: truncated bytes
    (tmp_path / "checkpoint-16").write_text("a file, not a checkpoint")
    assert last_complete_checkpoint(tmp_path) == ten


def test_failed_run_keeps_its_checkpoints_and_says_where(tmp_path):
    from hf_interop.utils import incomplete_run_dir, resumable_output_dir

    target = tmp_path / "run"
    stage = incomplete_run_dir(target)
    assert stage == tmp_path / ".incomplete-run" / "run"
    for interruption in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(interruption) as error:
            with resumable_output_dir(target, resume_from_checkpoint="true") as run:
                assert run.folder == stage and run.resume_from_checkpoint in (None, str(stage / "checkpoint-4"))
                if not (stage / "checkpoint-4").exists():
                    _checkpoint(stage, 4)
                raise interruption("killed")
        (note,) = error.value.__notes__
        assert note == (
            f"kept checkpoints in {str(stage)!r} (last: checkpoint-4); rerun the same command with "
            "--resume_from_checkpoint true to continue from checkpoint-4, or with --overwrite_output_dir to start afresh"
        )
        assert not target.exists() and (stage / "checkpoint-4" / "model.safetensors").is_file()
    # A rerun that neither resumes nor overwrites is refused before anything happens, naming the way out.
    with pytest.raises(
        FileExistsError, match=r"left checkpoints in .* \(last: checkpoint-4\); rerun the same command"
    ):
        with resumable_output_dir(target):
            pytest.fail("entered the block")
    # Resuming: the last complete checkpoint; on success the folder appears with its checkpoints inside.
    with resumable_output_dir(target, resume_from_checkpoint="True") as run:
        assert run.resume_from_checkpoint == str(stage / "checkpoint-4")
        (run.folder / "model.safetensors").write_bytes(b"final")
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-4", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resumable_output_dir_overwrite_resume_path_and_nothing_to_keep(tmp_path):
    from hf_interop.utils import incomplete_run_dir, resumable_output_dir

    target = tmp_path / "run"
    stage = incomplete_run_dir(target)
    # Nothing complete to keep (killed before the first save finished): cleared on failure and on the next start.
    with pytest.raises(RuntimeError):
        with resumable_output_dir(target) as run:
            _checkpoint(run.folder, 2, state=None)
            raise RuntimeError("failed before the first checkpoint")
    assert list(tmp_path.iterdir()) == []
    _checkpoint(stage, 2, state=None)
    with resumable_output_dir(target, resume_from_checkpoint=True) as run:
        assert run.resume_from_checkpoint is None  # the first run of a job that always passes `true`
    # --overwrite_output_dir without resuming: the kept checkpoints go, the new run starts from nothing.
    _checkpoint(stage, 6)
    with resumable_output_dir(target, overwrite=True) as run:
        assert list(run.folder.iterdir()) == [] and run.resume_from_checkpoint is None
        (run.folder / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    # A path resumes that checkpoint; it is checked before anything runs.
    elsewhere = _checkpoint(tmp_path / "elsewhere", 8)
    with resumable_output_dir(tmp_path / "second", resume_from_checkpoint=str(elsewhere)) as run:
        assert run.resume_from_checkpoint == str(elsewhere)
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint '.*nowhere' is not a folder"):
        with resumable_output_dir(tmp_path / "third", resume_from_checkpoint=str(tmp_path / "nowhere")):
            pass
    with pytest.raises(ValueError, match="holds no trainer_state.json"):
        with resumable_output_dir(tmp_path / "third", resume_from_checkpoint=str(target)):
            pass
    # A finished output folder is refused as before, in the command line's words.
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite_output_dir"):
        with resumable_output_dir(target, resume_from_checkpoint="true"):
            pass
