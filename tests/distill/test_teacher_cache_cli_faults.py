"""Faults injected into a real `hf-interop cache-teacher` subprocess: SIGTERM and SIGKILL once its first shard is
finished. The finished shards survive untouched, the same command resumes, and the cache it finishes is byte for byte
the one of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_causal_lm

from hf_interop import TeacherLogitsCache
from hf_interop.cli import EXIT_FAILURE, EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS, SHARD_SIZE = 64, 4  # 16 shards of 4 forwards: about 1.5 s of caching after the first shard on 2 cores
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory, corpus_tokenizer, corpus):
    """A small teacher (slow enough that a kill lands between its first and last shard) and a small text file."""
    root = tmp_path_factory.mktemp("cache_fault_assets")
    teacher = build_tiny_causal_lm(
        "llama", len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4,
    )  # fmt: skip
    teacher.save_pretrained(root / "teacher")
    corpus_tokenizer.save_pretrained(root / "teacher")
    text = "\n".join(" ".join(line.split()) for line in corpus["train"]["text"][:200] if line.strip())
    (root / "text.txt").write_text(text, encoding="utf-8")
    return {"teacher": str(root / "teacher"), "text": str(root / "text.txt")}


def _argv(assets: dict, output_dir: Path) -> list[str]:
    return [
        "cache-teacher", "--teacher_model_name_or_path", assets["teacher"], "--dataset", assets["text"],
        "--eval_split", "none", "--block_size", "64", "--max_train_blocks", str(NUM_BLOCKS),
        "--shard_size", str(SHARD_SIZE), "--batch_size", "1", "--top_k", "8", "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def _in_process(argv: list[str]) -> int:
    """`main(argv)` on one thread, as the subprocesses run (OMP_NUM_THREADS=1): byte-identical shards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.parent.name: path.read_bytes() for path in sorted(folder.glob("shard-*/data.arrow"))}


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file and folder of the finished shards: a recomputed shard gets new ones."""
    return {
        str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for shard in folder.glob("shard-*")
        for path in [shard, *shard.iterdir()]
    }


def _kill_after_first_shard(argv: list[str], output_dir: Path, kill_signal: int) -> tuple[int, str]:
    """Run `hf-interop ARGV` in a subprocess, send `kill_signal` once shard-00000 is complete; (exit code, stderr)."""
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_interop.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first_shard = output_dir / "shard-00000" / "shard.json"  # a shard folder appears complete, by a rename
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while process.poll() is None and not first_shard.is_file() and time.monotonic() < deadline:
            time.sleep(0.005)
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before shard-00000 could be seen")
        assert first_shard.is_file(), f"no shard-00000 after {KILL_TIMEOUT_S} s"
        process.send_signal(kill_signal)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, assets):
    """The cache of a run nobody interrupted (in-process, one thread)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "cache"
    assert _in_process(_argv(assets, output_dir)) == EXIT_OK
    return output_dir


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_cache_teacher_keeps_its_shards_and_resumes_to_the_uninterrupted_cache(
    kill_signal, assets, uninterrupted, tmp_path, capsys
):
    output_dir = tmp_path / "cache"
    argv = _argv(assets, output_dir)
    returncode, stderr = _kill_after_first_shard(argv, output_dir, kill_signal)
    if kill_signal == signal.SIGTERM:
        assert returncode == EXIT_FAILURE, stderr[-2000:]
        assert stderr.strip().splitlines()[-1].startswith("hf-interop cache-teacher: interrupted"), stderr[-2000:]
        # A SIGTERM that lands between the staging folder's creation and its cleanup (seen once in a CI run under
        # load) can leave a hidden `.tmp-shard-*` folder. It is never read as a shard, and the rerun below removes
        # it: that is the guarantee, asserted after the rerun.
    else:
        assert returncode == -signal.SIGKILL, stderr[-2000:]
    finished = sorted(path.name for path in output_dir.glob("shard-*"))
    assert "shard-00000" in finished and len(finished) < NUM_BLOCKS // SHARD_SIZE, finished
    assert not (output_dir / "manifest.json").exists()
    kept = _stamps(output_dir)
    kept_bytes = _shard_bytes(output_dir)

    # the same command resumes: the finished shards are neither recomputed nor rewritten
    capsys.readouterr()
    assert _in_process(argv) == EXIT_OK, capsys.readouterr().err[-2000:]
    stamps = _stamps(output_dir)
    assert {name: stamps[name] for name in kept} == kept
    assert {name: data for name, data in _shard_bytes(output_dir).items() if name in kept_bytes} == kept_bytes
    assert not list(output_dir.glob(".tmp-*"))

    # ... and the cache is the uninterrupted run's, shard for shard and value for value
    assert _shard_bytes(output_dir) == _shard_bytes(uninterrupted)
    resumed, straight = (json.loads((folder / "manifest.json").read_text()) for folder in (output_dir, uninterrupted))
    assert [shard["sha256"] for shard in resumed["shards"]] == [shard["sha256"] for shard in straight["shards"]]
    assert resumed["teacher_fingerprint"] == straight["teacher_fingerprint"] is not None
    assert len(TeacherLogitsCache.load(output_dir)) == NUM_BLOCKS
