"""Distillation on 2 CPU processes (gloo), under DDP and under FSDP2: the same weights as one process with the same
global batch, a teacher that is never wrapped or sharded, and only the main process logging and saving.

`accelerate launch --cpu --num_processes 2` silently runs ONE process, so DDP is launched with
`torchrun --nproc_per_node 2 tests/multiprocess_distill.py ... --use_cpu true`, and FSDP with
`accelerate launch --config_file recipes/accelerate_configs/fsdp_cpu.yaml ... --use_cpu true` (see recipes/README.md).
DeepSpeed ZeRO-3 (and FSDP on GPUs) need GPUs: those tests are marked `gpu` and hold the exact commands.
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

TESTS_DIR = Path(__file__).resolve().parents[1]  # tests/, which holds the launched multiprocess_distill.py
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


def _launch(command: list[str], root: Path, timeout: int = 300) -> dict:
    """Run a 2-rank launch of `multiprocess_distill.py` (reports under `root / "reports"`); per-rank reports and logs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS_DIR)}
    launched = _run(command, env=env, cwd=root, timeout=timeout)
    assert launched.returncode == 0, launched.stderr[-3000:]
    reports = {rank: json.loads((root / "reports" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    logs = {rank: (root / "reports" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    return {"root": root, "reports": reports, "logs": logs}


def _single_process(output_dir: Path, options: list[str]) -> dict:
    from hf_interop.cli import run_recipe

    single = run_recipe("distill", options, prog="test")
    assert single["trainer"].accelerator.num_processes == 1
    return {"output_dir": output_dir, "log_history": single["trainer"].state.log_history}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dirs, student_dir):
    """The reference: one process with the whole global batch (the chunked loss, as DDP uses)."""
    output_dir = tmp_path_factory.mktemp("one_process") / "out"
    return _single_process(
        output_dir, _distill_options(student_dir, tiny_model_dirs["llama"], output_dir, GLOBAL_BATCH)
    )


@pytest.fixture(scope="module")
def one_process_dense(tmp_path_factory, tiny_model_dirs, student_dir):
    """The reference for FSDP, which computes the loss from full logits: one process with the dense loss."""
    output_dir = tmp_path_factory.mktemp("one_process_dense") / "out"
    options = _distill_options(student_dir, tiny_model_dirs["llama"], output_dir, GLOBAL_BATCH)
    return _single_process(output_dir, [*options, "--loss_chunk_size", "0"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs, student_dir, one_process):
    root = tmp_path_factory.mktemp("multiprocess")
    # --standalone: a local rendezvous on a free port (parallel test runs do not collide).
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(TESTS_DIR / "multiprocess_distill.py")]
    command += [str(root / "reports")]
    command += _distill_options(student_dir, tiny_model_dirs["llama"], root / "two_processes", GLOBAL_BATCH // 2)
    return {**_launch(command, root), "one_process": one_process, "student_dir": student_dir}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dirs, student_dir, one_process_dense):
    """FSDP2 on 2 CPU ranks, launched exactly as recipes/README.md says (fsdp_cpu.yaml, `--use_cpu true`)."""
    root = tmp_path_factory.mktemp("fsdp_cpu")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [accelerate, "launch", "--config_file", str(REPO / "recipes" / "accelerate_configs" / "fsdp_cpu.yaml")]
    command += ["--main_process_port", "0", str(TESTS_DIR / "multiprocess_distill.py"), str(root / "reports")]
    command += _distill_options(student_dir, tiny_model_dirs["llama"], root / "two_processes", GLOBAL_BATCH // 2)
    return {**_launch(command, root), "one_process": one_process_dense, "student_dir": student_dir}


@pytest.fixture(scope="module")
def fsdp_torchrun_runs(tmp_path_factory, tiny_model_dirs, student_dir, one_process_dense):
    """FSDP2 asked for through the training arguments (`--fsdp --fsdp_config JSON`) under torchrun, full state dict."""
    root = tmp_path_factory.mktemp("fsdp_torchrun")
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(TESTS_DIR / "multiprocess_distill.py")]
    command += [str(root / "reports")]
    command += _distill_options(student_dir, tiny_model_dirs["llama"], root / "two_processes", GLOBAL_BATCH // 2)
    command += ["--fsdp", "--fsdp_config", json.dumps({"version": 2, "state_dict_type": "FULL_STATE_DICT"})]
    return {**_launch(command, root), "one_process": one_process_dense, "student_dir": student_dir}


def _differing_share(runs: dict, above: float) -> float:
    """Share of all saved weights whose |two ranks - one process| exceeds `above`."""
    two = load_file(str(runs["root"] / "two_processes" / "model.safetensors"))
    one = load_file(str(runs["one_process"]["output_dir"] / "model.safetensors"))
    differing = sum(int(((two[name] - one[name]).abs() > above).sum()) for name in one)
    return differing / sum(tensor.numel() for tensor in one.values())


def _max_weight_difference(runs: dict) -> float:
    """Largest |two ranks - one process| over all saved weights, after checking that training moved them at all."""
    two = load_file(str(runs["root"] / "two_processes" / "model.safetensors"))
    one = load_file(str(runs["one_process"]["output_dir"] / "model.safetensors"))
    initial = load_file(str(runs["student_dir"] / "model.safetensors"))
    assert two.keys() == one.keys()
    assert all(two[name].shape == one[name].shape for name in one), "the saved model must be whole, not a shard"
    largest_update = max(float((one[name] - initial[name]).abs().max()) for name in one)
    assert largest_update > 1e-4, "training must move the weights for the comparison to mean anything"
    return max(float((two[name] - one[name]).abs().max()) for name in one)


def _assert_same_losses_and_gradient_norms(runs: dict) -> None:
    """Adam's update hardly depends on the gradient's scale, so the weights alone would not catch gradients that are
    averaged wrongly over processes: the logged global gradient norm and the losses do."""

    def steps(history):
        return [(entry["loss"], entry["grad_norm"], entry["kd_loss"]) for entry in history if "grad_norm" in entry]

    two, one = steps(runs["reports"][0]["log_history"]), steps(runs["one_process"]["log_history"])
    assert len(two) == len(one) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-7)


def _assert_only_main_process_logs_and_saves(runs: dict) -> None:
    reports, logs = runs["reports"], runs["logs"]
    assert reports[1]["writes"] == [], "rank 1 wrote files"
    calls = {
        write["call"].rsplit(".", 2)[-2] + "." + write["call"].rsplit(".", 1)[-1] for write in reports[0]["writes"]
    }
    assert {"PreTrainedModel.save_pretrained", "cards.write_model_card"} <= calls
    # Training logs (loss dicts) and the recipe's summary line come from rank 0 only.
    assert "'kd_loss'" in logs[0] and "hf-interop distill: wrote" in logs[0]
    assert "'kd_loss'" not in logs[1] and "hf-interop distill: wrote" not in logs[1]
    # One complete output folder, no staging folder left behind.
    root = runs["root"]
    assert (root / "two_processes" / "model.safetensors").is_file() and (
        root / "two_processes" / "README.md"
    ).is_file()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


def test_two_ranks_really_ran_ddp_with_a_plain_teacher(runs):
    for rank, report in runs["reports"].items():
        assert report["num_processes"] == 2 and report["backend"] == "gloo" and report["global_step"] == 3
        assert report["student_wrapper"] == "DistributedDataParallel", "the student must be trained through DDP"
        assert not report["teacher_is_ddp"] and report["teacher_class"] == "LlamaForCausalLM"
        assert not report["teacher_requires_grad"] and not report["teacher_training"], rank


def test_weights_match_single_process_with_same_global_batch(runs):
    _assert_same_losses_and_gradient_norms(runs)
    difference = _max_weight_difference(runs)  # measured: 6e-8 (2 CPU ranks, float32)
    assert difference <= 1e-5, difference


def test_only_the_main_process_logs_and_saves(runs):
    _assert_only_main_process_logs_and_saves(runs)


def test_fsdp2_on_two_cpu_ranks_shards_the_student_not_the_teacher(fsdp_runs, tiny_model_dirs):
    from multiprocess_distill import weights_digest

    from hf_interop import load_causal_lm

    teacher, _ = load_causal_lm(str(tiny_model_dirs["llama"]))
    for rank, report in fsdp_runs["reports"].items():
        assert report["num_processes"] == 2 and report["backend"] == "gloo" and report["global_step"] == 3, rank
        # really FSDP2: the student is a fully_shard module whose parameters are DTensor shards (not DDP)
        assert report["distributed_type"] == "FSDP" and report["is_fsdp2"], report
        assert report["student_is_fsdp_module"] and report["student_sharded"], report
        assert report["student_wrapper"] != "DistributedDataParallel"
        # the student's output head is sharded outside its forward, so the dense loss replaces the chunked one
        assert not report["use_chunked_loss"]
        # the teacher: whole on every rank, frozen, in eval mode, never wrapped or sharded
        assert report["teacher_class"] == "LlamaForCausalLM" and not report["teacher_is_ddp"]
        assert not report["teacher_is_fsdp_module"] and not report["teacher_sharded"], report
        assert not report["teacher_requires_grad"] and not report["teacher_training"], rank
        # every rank holds the checkpoint's exact weights (none got an empty copy from rank-0-only loading)
        assert report["teacher_digest"] == weights_digest(teacher), rank


def test_fsdp2_weights_match_single_process_and_the_gathered_model_loads(fsdp_runs):
    from transformers import AutoModelForCausalLM

    _assert_same_losses_and_gradient_norms(fsdp_runs)
    # Against one process with the same (dense) loss: float32 rounding of a different summation order (reduce-scatter
    # of shards vs one backward). Adam divides each gradient by its own running size, so a weight whose gradient is
    # near zero turns a rounding difference into a visible update difference: measured max 2e-8 on an AMD EPYC (AVX2)
    # and 4.3e-6 on an Intel Xeon (AVX-512), where 13 of the 106,816 weights differ by more than 1e-7 (the chunked
    # loss of the DDP reference differs from the dense one in 36 of them, max 3e-6). Gradients that were not reduced
    # across ranks (each rank stepping on its half of the batch) would move nearly every weight: hence a bound on the
    # share of differing weights beside a loose one on the largest difference. The losses and gradient norms above
    # catch gradients reduced with the wrong scale, which Adam's update alone would hide.
    assert _max_weight_difference(fsdp_runs) <= 2e-5
    assert _differing_share(fsdp_runs, above=1e-7) <= 1e-3
    folder = fsdp_runs["root"] / "two_processes"
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved = load_file(str(folder / "model.safetensors"))
    for name, parameter in model.named_parameters():
        if name in saved:
            torch.testing.assert_close(parameter.detach(), saved[name], atol=0, rtol=0)


def test_fsdp2_only_the_main_process_logs_and_saves(fsdp_runs):
    _assert_only_main_process_logs_and_saves(fsdp_runs)


def test_fsdp2_through_training_arguments_under_torchrun(fsdp_torchrun_runs):
    for rank, report in fsdp_torchrun_runs["reports"].items():
        assert report["distributed_type"] == "FSDP" and report["is_fsdp2"] and report["student_sharded"], rank
        assert not report["teacher_sharded"] and not report["teacher_requires_grad"], rank
    _assert_same_losses_and_gradient_norms(fsdp_torchrun_runs)
    # the same bounds as with fsdp_cpu.yaml, for the same reason
    assert _max_weight_difference(fsdp_torchrun_runs) <= 2e-5
    assert _differing_share(fsdp_torchrun_runs, above=1e-7) <= 1e-3
    _assert_only_main_process_logs_and_saves(fsdp_torchrun_runs)


def test_fsdp1_on_cpu_processes_is_refused_with_a_clear_error():
    # FSDP1 (FullyShardedDataParallel) fails on CPU ranks inside torch ("Inconsistent compute device and
    # `device_id`"): the trainer refuses it before any model is wrapped, naming the setting and the fix.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_interop import DistillationTrainer

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)),
        args=SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1, "sync_module_states": False}),
    )
    with pytest.raises(ValueError, match=r"fsdp_version=1 on CPU processes.*'version': 2"):
        DistillationTrainer._cpu_fsdp_plugin(trainer)
    trainer.args.fsdp_plugin_args = {"fsdp_version": 2}
    assert DistillationTrainer._cpu_fsdp_plugin(trainer).fsdp_version == 2
    trainer.accelerator.state.distributed_type = DistributedType.MULTI_GPU  # Accelerate enables FSDP itself there
    assert DistillationTrainer._cpu_fsdp_plugin(trainer) is None


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
    assert all(r["is_fsdp2"] and r["student_sharded"] and not r["teacher_sharded"] for r in reports.values())
    assert reports[1]["writes"] == [] and (tmp_path / "out" / "README.md").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file(), "the final model is gathered under SHARDED_STATE_DICT"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_deepspeed_zero3_two_gpus_sharded_teacher(tmp_path, tiny_model_dirs, student_dir):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not a dependency: pip install deepspeed")
    reports = _launch_on_gpus("deepspeed_zero3.yaml", tmp_path, tiny_model_dirs, student_dir)
    # Under ZeRO-3 the trainer hands the teacher to a DeepSpeed inference engine (partitioned like the student).
    assert all(r["teacher_class"] == "DeepSpeedEngine" for r in reports.values())
    assert reports[1]["writes"] == [] and (tmp_path / "out" / "model.safetensors").is_file()
