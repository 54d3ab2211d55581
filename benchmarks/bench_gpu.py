"""GPU benchmark: KD loss at Liger's anchor sizes, trainer step vs TRL, and ensemble generation, on one CUDA device.

Three sections, each run on its own so that one failure keeps the others' numbers (results are rewritten after
every section):

a. Loss kernel at vocab 128,256 / hidden 2,048 (Llama-3 sizes, the anchor of Liger-Kernel's fused linear JSD
   numbers), bfloat16 hidden states and heads, 8k and 32k tokens (64k for the chunked loss only), forward KL and
   JSD(beta 0.5): naive PyTorch on full float32 log-softmaxes, TRL's `GKDTrainer.generalized_jsd_loss` on full
   logits, hf_interop's dense `distillation_loss` and `chunked_distillation_loss` (default chunk). Peak
   `torch.cuda.max_memory_allocated` above the memory held before the call, median forward+backward time.
b. One training step: TRL `GKDTrainer` (lmbda 0, beta 0: off-policy forward KL) vs hf_interop `DistillationTrainer`
   (forward KL, kd_ratio 1; chunked at the default chunk size, and dense with `loss_chunk_size=0`). Random teacher of
   Llama-3.2-1B's shape (bf16), random 8-layer student of hidden 1,024 (float32 weights, bf16 autocast), batch
   8 x 1,024 synthetic tokens; each trainer in a fresh subprocess, same weights and batches.
c. Greedy generation with a 3-member `EnsembleForCausalLM` of random SmolLM2-135M-shaped members (bf16): the
   ensemble with one KV cache per member vs the sum of the members' own `generate()` vs the ensemble without cache.

Random weights: speed and memory do not depend on them. Without a CUDA device the script prints that it skipped
and exits 0, leaving `results/gpu.*` as recorded. `--device cpu --smoke` runs every section with tiny sizes on CPU
and writes to a temporary folder (a check that the script works before spending device time). With `$OUT` set,
the result files are also copied there.

    python benchmarks/bench_gpu.py                      # on a machine with a CUDA device (about 3-5 min on an H200)
    python benchmarks/bench_gpu.py --device cpu --smoke # tiny end-to-end check on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common
from _common import write_result
from bench_losses import BETA

RESULT_NAME = "gpu"
SKIP_MESSAGE = "no CUDA device: skipped, recorded GPU results kept"
START = time.perf_counter()

# full sizes (CUDA) and the tiny ones of --smoke
FULL = {
    "loss_vocab": 128256,
    "loss_hidden": 2048,
    "loss_tokens": [8192, 32768],
    "loss_tokens_chunked_only": [65536],
    "loss_repeats": 3,
    "teacher": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "student": dict(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, intermediate_size=4096
    ),
    "trainer_vocab": 128256,
    "batch": 8,
    "block": 1024,
    "warmup_steps": 2,
    "timed_steps": 5,
    "member": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "member_vocab": 49152,
    "prompt_tokens": 64,
    "new_tokens": 128,
    "generate_repeats": 3,
}
SMOKE = {
    **FULL,
    "loss_vocab": 4096,
    "loss_hidden": 64,
    "loss_tokens": [256],
    "loss_tokens_chunked_only": [512],
    "loss_repeats": 1,
    "teacher": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "student": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    "trainer_vocab": 4096,
    "batch": 2,
    "block": 128,
    "warmup_steps": 1,
    "timed_steps": 1,
    "member": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "member_vocab": 4096,
    "prompt_tokens": 16,
    "new_tokens": 8,
    "generate_repeats": 1,
}
LOSS_METHODS = ("naive", "trl_gkd", "hf_dense", "hf_chunked", "hf_compiled", "hf_liger")
MIB = 2**20


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def tiny_tokenizer():
    """A 3-token word-level tokenizer (pad 0, eos/bos 1, unk 2): the trainers and the ensemble need a tokenizer
    object; every token id comes from the models' configs and the synthetic data, never from this vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>", unk_token="<unk>"
    )


def llama(shape: dict, vocab: int, dtype, device):
    """A randomly initialised Llama of the given shape, built directly on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        **shape,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device)  # parameters are already in `dtype`; no cast of the float32 rotary buffers


# ------------------------------------------------------------------------------------------------ a. loss kernel


def loss_inputs(tokens: int, sizes: dict, device, dtype):
    import torch

    hidden, vocab = sizes["loss_hidden"], sizes["loss_vocab"]
    generator = torch.Generator(device=device).manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.normal_(0.0, hidden**-0.5, generator=generator)
        teacher_head.weight.normal_(0.0, 2 * hidden**-0.5, generator=generator)
    student_hidden = torch.randn(tokens, hidden, generator=generator, device=device, dtype=dtype).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, generator=generator, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def loss_step(method: str, loss_type: str, inputs):
    """`bench_losses.make_step` (the same naive / TRL / hf_interop steps as the CPU benchmark); `hf_chunked` is its
    `hf_interop`. Returns the loss as a 0-d tensor (no sync)."""
    from bench_losses import SETTINGS, make_step

    SETTINGS["compiled_chunk_size"] = 1024
    return make_step("hf_interop" if method == "hf_chunked" else method, loss_type, inputs)


def measure_loss_cell(step, inputs, device, repeats: int) -> dict:
    """Warm-up run, then `repeats` timed runs; peak memory above the pre-call allocation (max over runs)."""
    import torch

    student_hidden, student_head = inputs[0], inputs[1]
    times, peaks, value = [], [], None
    for run in range(1 + repeats):
        student_hidden.grad = None
        student_head.weight.grad = None
        gc.collect()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        seconds = time.perf_counter() - start
        value = float(loss)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        if run > 0:
            times.append(seconds)
        del loss
    student_hidden.grad = None
    student_head.weight.grad = None
    return {
        "status": "ok",
        "seconds": statistics.median(times),
        "times": times,
        "peak_bytes": max(peaks) if peaks else None,
        "loss": value,
    }


def section_losses(sizes: dict, device, budget_s: float) -> tuple[str, dict]:
    import torch

    dtype = torch.bfloat16
    import importlib.util

    methods = [m for m in LOSS_METHODS if m != "hf_liger" or importlib.util.find_spec("liger_kernel") is not None]
    if device.type != "cuda":
        methods = [m for m in methods if m != "hf_liger"]
    cells = [(t, loss, m) for t in sizes["loss_tokens"] for loss in BETA for m in methods]
    cells += [(t, loss, "hf_chunked") for t in sizes["loss_tokens_chunked_only"] for loss in BETA]
    results: dict[tuple[int, str, str], dict] = {}
    current: tuple[int, tuple] | None = None
    for tokens, loss_type, method in cells:
        key = (tokens, loss_type, method)
        if tokens in sizes["loss_tokens_chunked_only"] and time.perf_counter() - START > budget_s * 0.3:
            results[key] = {"status": "not run: time budget"}
            log(f"losses {tokens} {loss_type} {method}: skipped (time budget)")
            continue
        try:
            if current is None or current[0] != tokens:
                current = None
                free_memory(device)
                current = (tokens, loss_inputs(tokens, sizes, device, dtype))
            results[key] = measure_loss_cell(
                loss_step(method, loss_type, current[1]), current[1], device, sizes["loss_repeats"]
            )
        except Exception as error:  # noqa: BLE001 - one cell's failure (OOM above all) must not lose the others
            results[key] = {"status": "OOM" if is_oom(error) else f"error: {type(error).__name__}: {error}"[:300]}
            if not is_oom(error):
                traceback.print_exc()
        if current is not None:
            current[1][0].grad = None
            current[1][1].weight.grad = None
        free_memory(device)
        cell = results[key]
        if cell["status"] == "ok":
            peak = f"{cell['peak_bytes'] / MIB:9.0f} MiB" if cell["peak_bytes"] is not None else "      - MiB"
            log(f"losses {tokens:>6} {loss_type:<10} {method:<10} {cell['seconds'] * 1e3:9.1f} ms {peak} "
                f"loss {cell['loss']:.6f}")  # fmt: skip
        else:
            log(f"losses {tokens:>6} {loss_type:<10} {method:<10} {cell['status']}")
    current = None
    free_memory(device)

    rows = [
        "| tokens | loss | method | peak memory above inputs (MiB) | fwd+bwd median (ms) | memory vs naive | "
        "time vs naive | loss value |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for tokens in sizes["loss_tokens"] + sizes["loss_tokens_chunked_only"]:
        for loss_type in BETA:
            naive = results.get((tokens, loss_type, "naive"), {})
            for method in LOSS_METHODS:
                cell = results.get((tokens, loss_type, method))
                if cell is None:
                    continue
                if cell["status"] != "ok":
                    rows.append(f"| {tokens} | {loss_type} | {method} | - | - | - | - | {cell['status']} |")
                    continue
                peak = cell["peak_bytes"]
                ok_naive = naive.get("status") == "ok"
                memory_ratio = f"{peak / naive['peak_bytes']:.2f}" if ok_naive and peak is not None else "-"
                time_ratio = f"{cell['seconds'] / naive['seconds']:.2f}" if ok_naive else "-"
                peak_mib = f"{peak / MIB:.0f}" if peak is not None else "-"
                rows.append(
                    f"| {tokens} | {loss_type} | {method} | {peak_mib} | {cell['seconds'] * 1e3:.1f} | {memory_ratio} | "
                    f"{time_ratio} | {cell['loss']:.6f} |"
                )
    markdown = (
        f"### a. Loss kernel (vocab {sizes['loss_vocab']:,}, hidden {sizes['loss_hidden']:,}, bfloat16)\n\n"
        "Forward+backward of the KD loss from final hidden states through output heads; the student's hidden states "
        "and head get gradients, the teacher's none. `naive`: full logits of both, float32 `log_softmax` + "
        "`F.kl_div` (JSD: mixture by `logaddexp`); `trl_gkd`: TRL `GKDTrainer.generalized_jsd_loss` on full logits "
        "(beta 0 = forward KL, 0.5 = JSD); `hf_dense`: `hf_interop.losses.distillation_loss` on full logits; "
        "`hf_chunked`: `hf_interop.losses.chunked_distillation_loss` (chunk 1,024, eager per-chunk ops, never builds "
        "full logits); `hf_compiled`: the same with `backend='compiled'` (one Triton kernel per chunk); `hf_liger`: "
        "the same with `backend='liger'` (Liger-Kernel's fused linear JSD; only when liger-kernel is installed). "
        "Peak memory: `torch.cuda.max_memory_allocated` above the allocation just before the call (inputs and heads "
        f"excluded, the head's gradient included); time: median of {sizes['loss_repeats']} runs after a warm-up. "
        "Liger-Kernel's anchor: fused linear JSD uses 84% less memory than plain PyTorch at 8,192 tokens, vocab "
        "128k (H100); compare the 8,192-token `jsd` rows' `memory vs naive`.\n\n" + "\n".join(rows)
    )
    data = [{"tokens": k[0], "loss_type": k[1], "method": k[2], **v} for k, v in results.items()]
    return markdown, {"loss_vocab": sizes["loss_vocab"], "loss_hidden": sizes["loss_hidden"], "cells": data}


# ------------------------------------------------------------------------------------------------ b. trainer step


def trainer_worker(kind: str, chunk_size: int | None, device_name: str, smoke: bool) -> dict:
    """One trainer run in this (fresh) process; returns its measurements."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_interop.distill.collators import _PaddingCollator

    sizes = SMOKE if smoke else FULL
    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    batch, block = sizes["batch"], sizes["block"]
    steps = sizes["warmup_steps"] + sizes["timed_steps"]
    vocab = sizes["trainer_vocab"]

    torch.manual_seed(0)
    teacher_dtype = torch.bfloat16 if on_cuda else torch.float32
    teacher = llama(sizes["teacher"], vocab, teacher_dtype, device).eval()
    student = llama(sizes["student"], vocab, torch.float32, device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch * steps, block), generator=generator)
    rows = Dataset.from_dict({"input_ids": ids.tolist()})
    tokenizer = tiny_tokenizer()
    collator = _PaddingCollator(tokenizer.pad_token_id)

    durations: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            durations.append(time.perf_counter() - self.start)

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench_gpu_{kind}_"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not on_cuda,
        bf16=on_cuda,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if kind == "hf_interop":
        from hf_interop import DistillationConfig, DistillationTrainer

        extra = {} if chunk_size is None else {"loss_chunk_size": chunk_size}
        args = DistillationConfig(loss_type="forward_kl", kd_ratio=1.0, temperature=1.0, **extra, **common)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=tokenizer,
            data_collator=collator, callbacks=[StepTimer()],
        )  # fmt: skip
        chunk_size = args.loss_chunk_size
        dense_or_chunked = "chunked" if getattr(trainer, "use_chunked_loss", chunk_size > 0) else "dense"
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=block, **common)
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=tokenizer,
            data_collator=collator, callbacks=[StepTimer()],
        )  # fmt: skip
        dense_or_chunked = "dense"
    free_memory(device)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    trainer.train()
    sync(device)
    timed = durations[sizes["warmup_steps"] :]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds_per_step = sum(timed) / len(timed)
    return {
        "kind": kind,
        "loss_chunk_size": chunk_size if kind == "hf_interop" else None,
        "loss_path": dense_or_chunked,
        "step_seconds": durations,
        "seconds_per_step": seconds_per_step,
        "samples_per_second": batch / seconds_per_step,
        "tokens_per_second": batch * block / seconds_per_step,
        "memory_before_train_bytes": before if on_cuda else None,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
        "peak_above_start_bytes": torch.cuda.max_memory_allocated(device) - before if on_cuda else None,
        "first_step_loss": losses[0] if losses else None,
        "last_step_loss": losses[-1] if losses else None,
    }


def run_trainer_worker(kind: str, chunk_size: int | None, device, smoke: bool, timeout_s: float) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--device", str(device)]
    if chunk_size is not None:
        command += ["--chunk_size", str(chunk_size)]
    if smoke:
        command.append("--smoke")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    try:
        process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        tail = (process.stdout[-2000:] + process.stderr[-3000:]).strip()
        print(tail, flush=True)
        oom = "out of memory" in tail.lower()
        last = tail.splitlines()[-1][:300] if tail else ""
        return {"status": "OOM" if oom else f"failed (exit {process.returncode}): {last}"}
    return {"status": "ok", **json.loads(lines[-1].removeprefix("RESULT "))}


def section_trainer(sizes: dict, device, smoke: bool, budget_s: float) -> tuple[str, dict]:
    variants = (("trl", None), ("hf_interop", None), ("hf_interop", 0))
    runs = {}
    for kind, chunk_size in variants:
        name = f"{kind}" if kind == "trl" else f"hf_interop_{'default' if chunk_size is None else chunk_size}"
        remaining = budget_s - (time.perf_counter() - START)
        timeout_s = max(60.0, min(150.0, remaining - 90.0)) if not smoke else 300.0
        log(f"trainer {name}: starting (timeout {timeout_s:.0f} s)")
        runs[name] = run_trainer_worker(kind, chunk_size, device, smoke, timeout_s)
        run = runs[name]
        if run["status"] == "ok":
            peak = f"{run['peak_bytes'] / MIB:.0f} MiB" if run["peak_bytes"] is not None else "-"
            log(f"trainer {name}: {run['seconds_per_step']:.3f} s/step, {run['tokens_per_second']:.0f} tokens/s, "
                f"peak {peak}, first loss {run['first_step_loss']}")  # fmt: skip
        else:
            log(f"trainer {name}: {run['status']}")
    trl_run = runs["trl"] if runs["trl"]["status"] == "ok" else None
    rows = [
        "| trainer | loss path (chunk) | s/step | samples/s | tokens/s | peak CUDA memory (MiB) | peak above start "
        "of train (MiB) | first-step loss | throughput vs TRL | peak memory vs TRL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        label = "TRL GKDTrainer" if name == "trl" else "hf_interop DistillationTrainer"
        if run["status"] != "ok":
            rows.append(f"| {label} | {name} | - | - | - | - | - | - | - | {run['status']} |")
            continue
        path = run["loss_path"] + (f" ({run['loss_chunk_size']})" if run["loss_chunk_size"] else "")
        speed = f"x{run['samples_per_second'] / trl_run['samples_per_second']:.2f}" if trl_run else "-"
        memory = (
            f"x{run['peak_bytes'] / trl_run['peak_bytes']:.2f}" if trl_run and run["peak_bytes"] is not None else "-"
        )
        peak = f"{run['peak_bytes'] / MIB:.0f}" if run["peak_bytes"] is not None else "-"
        above = f"{run['peak_above_start_bytes'] / MIB:.0f}" if run["peak_above_start_bytes"] is not None else "-"
        first = f"{run['first_step_loss']:.4f}" if run["first_step_loss"] is not None else "-"
        rows.append(
            f"| {label} | {path} | {run['seconds_per_step']:.3f} | {run['samples_per_second']:.2f} | "
            f"{run['tokens_per_second']:.0f} | {peak} | {above} | {first} | {speed} | {memory} |"
        )
    teacher, student = sizes["teacher"], sizes["student"]
    markdown = (
        "### b. Trainer step (off-policy forward KL)\n\n"
        f"Random teacher of Llama-3.2-1B's shape (hidden {teacher['hidden_size']}, {teacher['num_hidden_layers']} "
        f"layers, {teacher['num_attention_heads']}/{teacher['num_key_value_heads']} heads, intermediate "
        f"{teacher['intermediate_size']}, vocab {sizes['trainer_vocab']:,}, tied embeddings) in bfloat16; random "
        f"student (hidden {student['hidden_size']}, {student['num_hidden_layers']} layers, same vocabulary) with "
        "float32 weights under bf16 autocast (`bf16=True`), AdamW, constant LR. Batch "
        f"{sizes['batch']} x {sizes['block']} synthetic token ids; {sizes['timed_steps']} timed steps after "
        f"{sizes['warmup_steps']} warm-up steps (CUDA-synchronised step boundaries); each trainer in a fresh process "
        "with the same seeds, so the same weights and batches (the first-step losses agree when both computed the "
        "same forward KL). TRL: `GKDTrainer` with `lmbda=0, beta=0, seq_kd=False`. hf_interop: "
        "`DistillationTrainer(loss_type='forward_kl', kd_ratio=1)` at the default `loss_chunk_size` and dense "
        "(`loss_chunk_size=0`). Peak: `torch.cuda.max_memory_allocated` during `train()` (models, optimizer state "
        "and activations).\n\n" + "\n".join(rows)
    )
    return markdown, {"runs": runs}


# ------------------------------------------------------------------------------------------------ c. ensemble


def section_ensemble(sizes: dict, device, budget_s: float) -> tuple[str, dict]:
    import torch

    from hf_interop import EnsembleForCausalLM

    dtype = torch.bfloat16
    tokenizer = tiny_tokenizer()
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(llama(sizes["member"], sizes["member_vocab"], dtype, device).eval())
    ensemble = EnsembleForCausalLM.from_members([(model, tokenizer) for model in members], combination="mixture")
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, sizes["member_vocab"], (1, sizes["prompt_tokens"]), generator=generator).to(device)
    attention_mask = torch.ones_like(prompt)
    kwargs = dict(
        attention_mask=attention_mask,
        max_new_tokens=sizes["new_tokens"],
        min_new_tokens=sizes["new_tokens"],
        do_sample=False,
        pad_token_id=0,
    )
    outputs = {}

    def timed(key, model, **extra) -> float:
        sync(device)
        start = time.perf_counter()
        outputs[key] = model.generate(prompt, **{**kwargs, **extra})
        sync(device)
        return time.perf_counter() - start

    repeats = sizes["generate_repeats"]
    with torch.no_grad():
        short = dict(max_new_tokens=8, min_new_tokens=8)  # warm-ups: every kernel and code path, few tokens
        timed("warm", ensemble, **short)
        timed("warm", ensemble, use_cache=False, **short)
        for model in members:
            timed("warm", model, **short)
        log("ensemble: warmed up")
        ensemble_times, no_cache_times, member_times = [], [], [[] for _ in members]
        for round_index in range(repeats):  # interleaved rounds, medians per model
            round_start = time.perf_counter()
            ensemble_times.append(timed("cached", ensemble))
            for index, model in enumerate(members):
                member_times[index].append(timed("member", model))
            no_cache_times.append(timed("no_cache", ensemble, use_cache=False))
            log(f"ensemble: round {round_index + 1}/{repeats}: cached {ensemble_times[-1]:.2f} s, members "
                f"{sum(times[-1] for times in member_times):.2f} s, no cache {no_cache_times[-1]:.2f} s")  # fmt: skip
            round_seconds = time.perf_counter() - round_start
            if round_index + 1 < repeats and time.perf_counter() - START + round_seconds > budget_s:
                log(f"ensemble: stopping after {round_index + 1} rounds (time budget)")
                break
    cached, no_cache = outputs["cached"], outputs["no_cache"]
    equal = bool(torch.equal(cached, no_cache))
    mismatch = (cached != no_cache).nonzero()
    first_mismatch = None if equal or mismatch.numel() == 0 else int(mismatch[0, -1]) - sizes["prompt_tokens"]
    ensemble_s = statistics.median(ensemble_times)
    member_s = [statistics.median(times) for times in member_times]
    no_cache_s = statistics.median(no_cache_times)
    result = {
        "ensemble_s": ensemble_s,
        "member_s": member_s,
        "members_sum_s": sum(member_s),
        "no_cache_s": no_cache_s,
        "ratio_vs_sum": ensemble_s / sum(member_s),
        "no_cache_slowdown": no_cache_s / ensemble_s,
        "cached_equals_no_cache": equal,
        "first_mismatch_new_token": first_mismatch,
        "ensemble_times": ensemble_times,
        "no_cache_times": no_cache_times,
        "member_times": member_times,
    }
    member = sizes["member"]
    params = sum(p.numel() for p in members[0].parameters()) / 1e6
    agreement = "yes" if equal else f"no (first difference at new token {first_mismatch})"
    markdown = (
        "### c. Ensemble generation\n\n"
        f"3 random members of SmolLM2-135M's shape (hidden {member['hidden_size']}, {member['num_hidden_layers']} "
        f"layers, {member['num_attention_heads']}/{member['num_key_value_heads']} heads, intermediate "
        f"{member['intermediate_size']}, vocab {sizes['member_vocab']:,}; {params:.0f}M parameters each) in bfloat16 "
        f"on {'the GPU' if device.type == 'cuda' else 'CPU'}, mixture combination; greedy {sizes['new_tokens']} new tokens after a {sizes['prompt_tokens']}-"
        f"token prompt, batch 1; medians of {len(ensemble_times)} interleaved rounds after a short warm-up (8 tokens "
        "per model).\n\n"
        "| ensemble (cached) s | sum of members' own generate() s | no-cache ensemble s | ensemble / sum | "
        "no-cache / ensemble | cached == no-cache tokens |\n|---:|---:|---:|---:|---:|---|\n"
        f"| {ensemble_s:.3f} | {sum(member_s):.3f} | {no_cache_s:.3f} | {result['ratio_vs_sum']:.2f}x | "
        f"{result['no_cache_slowdown']:.1f}x | {agreement} |\n\n"
        "Targets: ensemble <= 1.15x the sum of its members' generate(); no-cache >= 5x slower. In bfloat16 the "
        "cached and re-encoded paths run different kernels (shapes), so an early tie between near-equal logits "
        "can make greedy tokens part ways; that is a rounding effect, not a cache bug."
    )
    return markdown, result


# ------------------------------------------------------------------------------------------------ driver


def device_line(device) -> str:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}), "
            f"CUDA {torch.version.cuda}"
        )
    else:
        gpu = "CPU (smoke run, tiny sizes)"
    return f"Device: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}."


def save(sections: dict, data: dict, device, out_dir: str | None) -> None:
    markdown = device_line(device) + "\n\n" + "\n\n".join(sections.values())
    write_result(RESULT_NAME, markdown, {"device": device_line(device), **data})
    if out_dir:
        target = Path(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".json"):
            shutil.copy2(_common.RESULTS_DIR / f"{RESULT_NAME}{suffix}", target / f"{RESULT_NAME}{suffix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; results go to a temporary folder")
    parser.add_argument("--sections", nargs="+", default=["losses", "trainer", "ensemble"])
    parser.add_argument("--budget-s", type=float, default=300.0, help="optional cells are skipped past this")
    parser.add_argument("--worker", choices=["trl", "hf_interop"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    import torch

    if options.worker:
        result = trainer_worker(options.worker, options.chunk_size, options.device, options.smoke)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if options.device is None:
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
        if options.device == "cpu" and not options.smoke:
            print(SKIP_MESSAGE, flush=True)
            return 0
    if options.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_MESSAGE, flush=True)
        return 0
    if options.device == "cpu" and not options.smoke:
        parser.error("--device cpu runs only with --smoke (the full sizes need a GPU)")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if options.smoke:
        _common.RESULTS_DIR = Path(tempfile.mkdtemp(prefix="bench_gpu_smoke_"))
    device = torch.device(options.device)
    sizes = SMOKE if options.smoke else FULL
    out_dir = os.environ.get("OUT")
    log(device_line(device))

    sections: dict[str, str] = {}
    data: dict = {"smoke": options.smoke, "sizes": sizes}
    failures = []
    for name in options.sections:
        log(f"section {name}: start")
        try:
            if name == "losses":
                sections[name], data[name] = section_losses(sizes, device, options.budget_s)
            elif name == "trainer":
                sections[name], data[name] = section_trainer(sizes, device, options.smoke, options.budget_s)
            elif name == "ensemble":
                sections[name], data[name] = section_ensemble(sizes, device, options.budget_s)
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception as error:  # noqa: BLE001 - keep the other sections' numbers
            traceback.print_exc()
            failures.append(name)
            sections[name] = f"### {name}\n\nFailed: {type(error).__name__}: {str(error)[:500]}"
            data[name] = {"error": f"{type(error).__name__}: {error}"}
        free_memory(device)
        data["total_seconds"] = time.perf_counter() - START
        save(sections, data, device, out_dir)
        log(f"section {name}: done")
    log(f"results in {_common.RESULTS_DIR}; total {time.perf_counter() - START:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
