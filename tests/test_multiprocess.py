"""Distillation on 2 CPU processes (gloo): same weights as one process with the same global batch, a teacher that is
never DDP-wrapped, and only the main process logging and saving.

`accelerate launch --cpu --num_processes 2` silently runs ONE process, so the test launches
`torchrun --nproc_per_node 2 tests/multiprocess_distill.py` (see recipes/README.md). FSDP and DeepSpeed ZeRO-3 need
GPUs here: their tests are marked `gpu` and hold the exact commands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_causal_lm
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, corpus_tokenizer):
    model = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=3, tokenizer=corpus_tokenizer)
    folder = tmp_path_factory.mktemp("mp_student")
    model.save_pretrained(folder)
    corpus_tokenizer.save_pretrained(folder)
    return folder


def _distill_options(student_dir, teacher_dir, output_dir, per_device_batch: int) -> list[str]:
    return [
        "--student_model_name_or_path", str(student_dir),
        "--teacher_model_name_or_path", str(teacher_dir),
        "--output_dir", str(output_dir),
        "--max_steps", "3",
        "--per_device_train_batch_size", str(per_device_batch),
        "--learning_rate", "1e-3",
        "--block_size", "32",
        "--max_train_blocks", "48",
        "--eval_split", "none",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--use_cpu", "true",
        "--seed", "7",
    ]  # fmt: skip


def _run(command: list[str], env: dict, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group, so a hang kills the launcher AND its worker processes."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _torchrun() -> list[str]:
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs, student_dir):
    root = tmp_path_factory.mktemp("multiprocess")
    teacher_dir = tiny_model_dirs["llama"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS_DIR)}
    # --standalone: a local rendezvous on a free port (parallel test runs do not collide).
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(TESTS_DIR / "multiprocess_distill.py")]
    command += [str(root / "reports")]
    command += _distill_options(student_dir, teacher_dir, root / "two_processes", GLOBAL_BATCH // 2)
    launched = _run(command, env=env, cwd=root, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    from hf_interop.cli import run_recipe

    single = run_recipe(
        "distill", _distill_options(student_dir, teacher_dir, root / "one_process", GLOBAL_BATCH), prog="test"
    )
    assert single["trainer"].accelerator.num_processes == 1
    reports = {rank: json.loads((root / "reports" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    logs = {rank: (root / "reports" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    return {"root": root, "reports": reports, "logs": logs, "student_dir": student_dir}


def test_two_ranks_really_ran_ddp_with_a_plain_teacher(runs):
    for rank, report in runs["reports"].items():
        assert report["num_processes"] == 2 and report["backend"] == "gloo" and report["global_step"] == 3
        assert report["student_wrapper"] == "DistributedDataParallel", "the student must be trained through DDP"
        assert not report["teacher_is_ddp"] and report["teacher_class"] == "LlamaForCausalLM"
        assert not report["teacher_requires_grad"] and not report["teacher_training"], rank


def test_weights_match_single_process_with_same_global_batch(runs):
    root = runs["root"]
    two = load_file(str(root / "two_processes" / "model.safetensors"))
    one = load_file(str(root / "one_process" / "model.safetensors"))
    initial = load_file(str(runs["student_dir"] / "model.safetensors"))
    assert two.keys() == one.keys()
    largest_update = max(float((one[name] - initial[name]).abs().max()) for name in one)
    assert largest_update > 1e-4, "training must move the weights for the comparison to mean anything"
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_only_the_main_process_logs_and_saves(runs):
    reports, logs = runs["reports"], runs["logs"]
    assert reports[1]["writes"] == [], "rank 1 wrote files"
    calls = {
        write["call"].rsplit(".", 2)[-2] + "." + write["call"].rsplit(".", 1)[-1] for write in reports[0]["writes"]
    }
    assert {"PreTrainedModel.save_pretrained", "model_card.write_model_card"} <= calls
    # Training logs (loss dicts) and the recipe's summary line come from rank 0 only.
    assert "'kd_loss'" in logs[0] and "hf-interop distill: wrote" in logs[0]
    assert "'kd_loss'" not in logs[1] and "hf-interop distill: wrote" not in logs[1]
    # One complete output folder, no staging folder left behind.
    root = runs["root"]
    assert (root / "two_processes" / "model.safetensors").is_file() and (
        root / "two_processes" / "README.md"
    ).is_file()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Sharded engines: need GPUs here (documented commands; run on a machine with 2+ CUDA devices)
# ---------------------------------------------------------------------------------------------------------------


def _launch_on_gpus(config_file: str, tmp_path, tiny_model_dirs, student_dir) -> dict:
    """`accelerate launch --config_file recipes/accelerate_configs/<config_file> --num_processes 2
    tests/multiprocess_distill.py REPORTS --student_model_name_or_path S --teacher_model_name_or_path T ...`"""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [accelerate, "launch", "--config_file", str(REPO / "recipes" / "accelerate_configs" / config_file)]
    command += ["--num_processes", "2", "--mixed_precision", "no", str(TESTS_DIR / "multiprocess_distill.py")]
    options = _distill_options(student_dir, tiny_model_dirs["llama"], tmp_path / "out", GLOBAL_BATCH // 2)
    options = [option for option in options if option not in ("--use_cpu", "true")]
    command += [str(tmp_path / "reports"), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS_DIR)}
    launched = _run(command, env=env, cwd=tmp_path, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return {rank: json.loads((tmp_path / "reports" / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_two_gpus(tmp_path, tiny_model_dirs, student_dir):
    reports = _launch_on_gpus("fsdp.yaml", tmp_path, tiny_model_dirs, student_dir)
    assert all(r["num_processes"] == 2 and not r["teacher_requires_grad"] for r in reports.values())
    assert reports[1]["writes"] == [] and (tmp_path / "out" / "README.md").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_deepspeed_zero3_two_gpus_sharded_teacher(tmp_path, tiny_model_dirs, student_dir):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not a dependency: pip install deepspeed")
    reports = _launch_on_gpus("deepspeed_zero3.yaml", tmp_path, tiny_model_dirs, student_dir)
    # Under ZeRO-3 the trainer hands the teacher to a DeepSpeed inference engine (partitioned like the student).
    assert all(r["teacher_class"] == "DeepSpeedEngine" for r in reports.values())
    assert reports[1]["writes"] == [] and (tmp_path / "out" / "model.safetensors").is_file()
