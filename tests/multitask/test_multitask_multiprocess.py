"""Multi-task training on 2 CPU processes (gloo, DDP) gives the weights and learned task weights of one process with
the same global batch: every process draws the same task at each step, the uncertainty log-variances (outside the
DDP-wrapped model) have their gradients averaged, and PCGrad compares gradients averaged over processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tiny_causal_lm
from multitask_data import task_datasets
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus, corpus_tokenizer):
    root = tmp_path_factory.mktemp("mp_multitask")
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=3, tokenizer=corpus_tokenizer)
    model.save_pretrained(root / "model")
    corpus_tokenizer.save_pretrained(root / "model")
    train, _ = task_datasets(corpus, corpus_tokenizer)
    for task, rows in train.items():
        rows.save_to_disk(str(root / "data" / task))
    return root


def _torchrun() -> list[str]:
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]


def _two_processes(root: Path, output: Path, weighting: str, sampling: str) -> None:
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(TESTS_DIR / "multiprocess_multitask.py")]
    command += [str(root / "model"), str(root / "data"), str(output), str(GLOBAL_BATCH // 2), weighting, sampling]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)]),
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    assert json.loads((output / "world.json").read_text()) == {"num_processes": 2}


@pytest.mark.parametrize(("weighting", "sampling"), [("uncertainty", "proportional"), ("pcgrad", "all")])
def test_two_processes_give_the_weights_of_one(inputs, tmp_path, weighting, sampling):
    from multiprocess_multitask import run

    one, two = tmp_path / "one", tmp_path / "two"
    run(str(inputs / "model"), str(inputs / "data"), str(one), GLOBAL_BATCH, weighting, sampling)
    _two_processes(inputs, two, weighting, sampling)
    single, double = load_file(str(one / "final.safetensors")), load_file(str(two / "final.safetensors"))
    initial = load_file(str(inputs / "model" / "model.safetensors"))
    assert single.keys() == double.keys()
    moved = max(
        float((single[f"backbone.{n}"] - t).abs().max()) for n, t in initial.items() if f"backbone.{n}" in single
    )
    assert moved > 1e-4, "training must move the weights for the comparison to mean anything"
    for name in single:
        difference = float((single[name] - double[name]).abs().max())
        assert difference <= 1e-5, (name, difference)
    if weighting == "uncertainty":
        assert float(single["log_variances"].abs().max()) > 1e-3  # the learned weights moved, and agree
    # the same task at every step, and the same per-task losses
    history = [json.loads((folder / "log_history.json").read_text()) for folder in (one, two)]
    steps = [[e for e in h if "loss" in e] for h in history]
    for a, b in zip(*steps, strict=True):
        keys = [k for k in a if k.endswith(("_loss", "_steps", "_weight"))]
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5, abs=1e-6)
