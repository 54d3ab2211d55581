"""Merges under real faults: damaged input weights, a full disk, a SIGKILL mid-write and a concurrent merge into the
same folder. In every case the output folder either is complete or does not exist, and no staging folder is left."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from safetensors_damage import DAMAGES, damage_safetensors

from hf_interop import ModelLoadingError, merge_checkpoints
from hf_interop.merge import streaming

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_copies(tiny_model_dirs, tmp_path):
    """Two copies of the tiny Llama: their linear merge equals either of them, bit for bit."""
    return [shutil.copytree(tiny_model_dirs["llama"], tmp_path / name) for name in ("run_a", "run_b")]


def _assert_no_staging_left(output_dir: Path) -> None:
    left = [path.name for path in output_dir.parent.iterdir() if path.name.startswith((".tmp-", ".old-"))]
    assert not left, f"staging folders left behind: {left}"


def _assert_complete_merge(output_dir: Path, source: Path) -> None:
    expected = load_file(source / "model.safetensors")
    merged = load_file(output_dir / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert merged[name].equal(tensor), name
    for file_name in ("config.json", "tokenizer.json", "README.md", "hf_interop_lineage.json"):
        assert (output_dir / file_name).is_file(), file_name


# ---------------------------------------------------------------------------------------------------------------
# Damaged inputs: one error naming the file, before any output exists
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_input_weights_name_the_file_before_any_output(kind, two_copies, tmp_path):
    weights = two_copies[1] / "model.safetensors"
    damage_safetensors(weights, kind)
    output_dir = tmp_path / "merged"
    with pytest.raises(ModelLoadingError) as caught:
        merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
    message = str(caught.value)
    assert str(weights) in message
    assert DAMAGES[kind] in message
    assert "Download it again" in message
    assert not output_dir.exists()
    _assert_no_staging_left(output_dir)


def test_missing_shard_of_a_sharded_input_is_named(two_copies, tmp_path):
    sharded = tmp_path / "sharded"
    merge_checkpoints(two_copies, output_dir=sharded, max_shard_size="100KB", show_progress=False)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[0].unlink()
    with pytest.raises(ModelLoadingError, match=f"{re.escape(shards[0].name)}.*missing"):
        merge_checkpoints([sharded, two_copies[0]], output_dir=tmp_path / "merged", show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# A full disk while writing: the error names the output and the cause, nothing half-written stays
# ---------------------------------------------------------------------------------------------------------------


def _full_disk_after(monkeypatch, writes_allowed: int) -> None:
    real_write = streaming._ShardWriter._write
    calls = {"count": 0}

    def write(self, data):
        calls["count"] += 1
        if calls["count"] > writes_allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(streaming._ShardWriter, "_write", write)


@pytest.mark.parametrize("writes_allowed", [0, 5])
def test_full_disk_while_writing_shards_names_the_output(two_copies, tmp_path, monkeypatch, writes_allowed):
    output_dir = tmp_path / "merged"
    _full_disk_after(monkeypatch, writes_allowed)
    with pytest.raises(OSError) as caught:
        merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert "no space left on device" in message
    assert str(output_dir / "model.safetensors") in message
    assert "free space" in message.lower()
    assert not output_dir.exists()
    _assert_no_staging_left(output_dir)


def test_full_disk_while_copying_the_config_keeps_the_old_output(two_copies, tmp_path, monkeypatch):
    output_dir = tmp_path / "merged"
    merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    import hf_interop.merge.checkpoints as checkpoints

    def full_copy(source, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.shutil, "copyfile", full_copy)
    with pytest.raises(OSError, match="no space left on device") as caught:
        merge_checkpoints(two_copies, output_dir=output_dir, overwrite=True, show_progress=False)
    assert str(output_dir / "config.json") in str(caught.value)
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == before
    _assert_no_staging_left(output_dir)


def test_read_errors_of_inputs_are_not_reported_as_a_full_output_disk(two_copies, tmp_path, monkeypatch):
    def unreadable(self, name):
        def read(start, end):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.folder / "model.safetensors"))

        return read

    monkeypatch.setattr(streaming._SafetensorsCheckpoint, "reader", unreadable)
    with pytest.raises(OSError) as caught:
        merge_checkpoints(two_copies, output_dir=tmp_path / "merged", show_progress=False)
    assert caught.value.errno == errno.EIO
    assert "no space" not in str(caught.value)
    assert str(two_copies[0] / "model.safetensors") in str(caught.value)
    _assert_no_staging_left(tmp_path / "merged")


# ---------------------------------------------------------------------------------------------------------------
# A merge killed mid-write, and a merge still running
# ---------------------------------------------------------------------------------------------------------------

# Merges in a child process that signals after its first block is written, then hangs there: a SIGKILL then hits a
# merge with a half-written shard, every time.
_SLOW_MERGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_interop.merge import merge_checkpoints, streaming

    marker = Path(sys.argv[4])
    real_write_block = streaming._ShardWriter.write_block

    def write_block_then_hang(self, tensor):
        real_write_block(self, tensor)
        self._handle.flush()
        marker.touch()
        time.sleep(600)

    streaming._ShardWriter.write_block = write_block_then_hang
    merge_checkpoints([sys.argv[1], sys.argv[2]], output_dir=sys.argv[3], show_progress=False)
    """
)


def _start_slow_merge(checkpoints, output_dir: Path, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_MERGE, *map(str, checkpoints), str(output_dir), str(marker)],
        env={**env, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the merge exited before writing: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the merge wrote nothing within 120 s")
        time.sleep(0.05)
    return process


def test_rerun_after_a_killed_merge_removes_its_staging_folder(two_copies, tmp_path):
    output_dir = tmp_path / "merged"
    process = _start_slow_merge(two_copies, output_dir, tmp_path / "first_block_written")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    staging = [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-merged-")]
    assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()  # the kill left a half shard
    assert not output_dir.exists()  # and no output folder that looks complete

    merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
    _assert_no_staging_left(output_dir)
    _assert_complete_merge(output_dir, two_copies[0])


def test_merge_into_a_folder_another_merge_is_writing_is_refused(two_copies, tmp_path):
    output_dir = tmp_path / "merged"
    process = _start_slow_merge(two_copies, output_dir, tmp_path / "first_block_written")
    try:
        with pytest.raises(
            FileExistsError, match=f"another merge \\(pid {process.pid}\\b.*{re.escape(str(output_dir))}"
        ):
            merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
        staging = [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-merged-")]
        assert len(staging) == 1  # the running merge's folder is left alone
    finally:
        process.kill()
        process.wait(timeout=60)


def test_staging_folders_of_other_outputs_and_of_unknown_writers_are_left_alone(two_copies, tmp_path):
    output_dir = tmp_path / "merged"
    other_output = tmp_path / ".tmp-merged-v2-abcd1234"  # staging of a folder named merged-v2
    unknown_writer = tmp_path / ".tmp-merged-q1w2e3r4"  # no owner record: not known to be a dead merge
    for folder in (other_output, unknown_writer):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    superseded = tmp_path / ".old-merged-0123abcd"  # a previous output, moved aside by a run killed mid-swap
    superseded.mkdir()
    merge_checkpoints(two_copies, output_dir=output_dir, show_progress=False)
    _assert_complete_merge(output_dir, two_copies[0])
    assert other_output.is_dir() and unknown_writer.is_dir()
    assert not superseded.exists()
