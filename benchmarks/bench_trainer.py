"""Trainer step: hf_interop's DistillationTrainer vs TRL's GKDTrainer on the same off-policy forward-KL job.

Teacher: the real SmolLM2-135M-Instruct (float32). Student: 4 layers of the teacher's architecture (hidden 576,
vocabulary 49,152) initialised from the teacher's layers. Both trainers get the same student weights, the same
packed batches of the builtin corpus, AdamW, no on-policy generation (TRL `lmbda=0`) and forward KL at temperature 1
(TRL `beta=0`; hf_interop `loss_type="forward_kl"`, `kd_ratio=1`). Each trainer runs in its own subprocess so that
peak memory is measured from a clean process; the parent prints one table with ratios. Both trainers run in
float32, then both under bfloat16 autocast; the precision is always set explicitly, since TRL's configs default to
`bf16=True` (on this CPU that alone made TRL's teacher forward about 2.5x faster than a float32 one).

Run: `python benchmarks/bench_trainer.py` (about 7 minutes on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import PeakRSS, max_rss_bytes, write_result

BATCH_SIZE = 4
BLOCK_SIZE = 128
WARMUP_STEPS = 1
TIMED_STEPS = 6
STUDENT_LAYERS = 4
ROUNDS = int(os.environ.get("BENCH_TRAINER_ROUNDS", 3))  # interleaved rounds; the best round of each trainer counts
# (worker kind, loss_chunk_size, precision, loss backend): TRL, then hf_interop with the eager and the compiled
# per-chunk path, in float32; then the same under bfloat16 autocast (`bf16=True`). Precision is set explicitly for
# both trainers: TRL's configs default to bf16=True, ours to False, and comparing those defaults would compare
# precisions, not trainers. `--variants` picks a subset by index.
VARIANTS = (
    ("trl", 0, "fp32", "-"),
    ("hf_interop", 1024, "fp32", "eager"),
    ("hf_interop", 1024, "fp32", "compiled"),
    ("trl", 0, "bf16", "-"),
    ("hf_interop", 1024, "bf16", "eager"),
    ("hf_interop", 1024, "bf16", "compiled"),
)


def _student_and_data(work_dir: Path):
    """The shared student checkpoint and packed rows (built once by the parent, loaded by both workers)."""
    from hf_interop import init_student_from_teacher, load_builtin_corpus, load_default_teacher, pack_dataset

    student_dir = work_dir / "student"
    data_dir = work_dir / "data"
    if not student_dir.exists():
        teacher, tokenizer = load_default_teacher()
        student = init_student_from_teacher(teacher, num_layers=STUDENT_LAYERS)
        student.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
        rows = pack_dataset(load_builtin_corpus()["train"], tokenizer, block_size=BLOCK_SIZE)
        rows.select(range(BATCH_SIZE * (WARMUP_STEPS + TIMED_STEPS))).save_to_disk(str(data_dir))
    return student_dir, data_dir


class _StepTimer:
    """A TrainerCallback that records the wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.durations.append(time.perf_counter() - timer.start)

        self.durations: list[float] = []
        self.callback = Callback()


def _common_arguments(output_dir: Path, precision: str) -> dict:
    return dict(
        bf16=precision == "bf16",
        output_dir=str(output_dir),
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def worker(kind: str, work_dir: Path, chunk_size: int, precision: str, backend: str) -> dict:
    import torch
    from datasets import load_from_disk

    from hf_interop import load_causal_lm, load_default_teacher
    from hf_interop.distill.collators import _PaddingCollator

    torch.manual_seed(0)
    teacher, tokenizer = load_default_teacher()
    student, _ = load_causal_lm(work_dir / "student", dtype="float32")
    rows = load_from_disk(str(work_dir / "data"))
    timer = _StepTimer()
    collator = _PaddingCollator(tokenizer.pad_token_id)
    if kind == "hf_interop":
        from hf_interop import DistillationConfig, DistillationTrainer

        args = DistillationConfig(
            loss_type="forward_kl",
            kd_ratio=1.0,
            temperature=1.0,
            loss_chunk_size=chunk_size,
            loss_backend=backend,
            **_common_arguments(work_dir / kind, precision),
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[timer.callback],
        )
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            seq_kd=False,
            max_length=BLOCK_SIZE,
            **_common_arguments(work_dir / kind, precision),
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[timer.callback],
        )
    with PeakRSS() as peak:
        trainer.train()
    timed = timer.durations[WARMUP_STEPS:]
    first_loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return {
        "samples_per_second": BATCH_SIZE * len(timed) / sum(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "peak_rss_increase_bytes": peak.delta,
        "max_rss_bytes": max_rss_bytes(),
        "first_step_loss": first_loss,
    }


def _run_worker(kind: str, chunk_size: int, precision: str, backend: str, work_dir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--chunk_size",
        str(chunk_size),
        "--precision",
        precision,
        "--backend",
        backend,
        "--work_dir",
        str(work_dir),
    ]
    process = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.stderr.write(process.stdout[-4000:] + process.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {process.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=["hf_interop", "trl"])
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backend", default="eager", help="hf_interop's loss_backend (worker)")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--variants", type=int, nargs="+", default=None, help="indices into VARIANTS (default: all)")
    parser.add_argument("--result_name", default="trainer", help="benchmarks/results/<name>.md")
    options = parser.parse_args()
    if options.worker:
        result = worker(options.worker, Path(options.work_dir), options.chunk_size, options.precision, options.backend)
        result["load"] = os.getloadavg()[0]
        print("RESULT " + json.dumps(result), flush=True)
        return

    import tempfile

    import trl

    work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="bench_trainer_"))
    _student_and_data(work_dir)
    variants = [VARIANTS[index] for index in options.variants] if options.variants else list(VARIANTS)
    rounds: dict[tuple[str, int, str, str], list[dict]] = {variant: [] for variant in variants}
    for _ in range(ROUNDS):  # interleaved, so a load change on the shared machine hits every variant alike
        for variant in variants:
            rounds[variant].append(_run_worker(*variant, work_dir))
            print(variant, {k: round(v, 3) for k, v in rounds[variant][-1].items()}, flush=True)
    best = {
        variant: {
            **max(runs, key=lambda run: run["samples_per_second"]),
            "peak_rss_increase_bytes": min(run["peak_rss_increase_bytes"] for run in runs),
            "max_rss_bytes": min(run["max_rss_bytes"] for run in runs),
        }
        for variant, runs in rounds.items()
    }

    theirs = {precision: best[variant] for variant in variants if variant[0] == "trl" for precision in [variant[2]]}
    mib = 2**20
    markdown = (
        f"Off-policy forward-KL distillation, SmolLM2-135M-Instruct teacher (float32) -> {STUDENT_LAYERS}-layer "
        f"student initialised from its layers; batch {BATCH_SIZE} x {BLOCK_SIZE} tokens (about "
        f"{BATCH_SIZE * (BLOCK_SIZE - 1)} valid targets), AdamW, CPU; float32, then both trainers under bfloat16 "
        f"autocast (`bf16=True`, float32 weights; each ratio is against TRL at the same precision); {TIMED_STEPS} "
        "timed steps after "
        f"{WARMUP_STEPS} warm-up step, each run in a fresh process, {ROUNDS} interleaved rounds (best throughput, "
        f"lowest memory of each); trl {trl.__version__} `GKDTrainer` with `lmbda=0, beta=0`. Timings come from a "
        "2-core machine that other jobs may share, so throughput ratios are rough; memory is not affected.\n\n"
        "| trainer | precision | loss chunk (tokens) | loss backend | samples/s | s/step | peak RSS increase during "
        "train (MiB) | process max RSS (MiB) | first-step loss | throughput vs TRL | memory increase vs TRL | load "
        "(1 min, at the end of the best run) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    ratios = {}
    for (kind, chunk_size, precision, backend), result in best.items():
        name = "TRL GKDTrainer" if kind == "trl" else "hf_interop DistillationTrainer"
        reference = theirs[precision]
        speed = result["samples_per_second"] / reference["samples_per_second"]
        memory = result["peak_rss_increase_bytes"] / max(reference["peak_rss_increase_bytes"], 1)
        ratios[f"{kind}_{chunk_size}_{precision}_{backend}"] = {"throughput": speed, "memory": memory}
        markdown += (
            f"| {name} | {precision} | {chunk_size if kind != 'trl' else 'dense'} | {backend} | "
            f"{result['samples_per_second']:.2f} | "
            f"{result['seconds_per_step']:.2f} | {result['peak_rss_increase_bytes'] / mib:.0f} | "
            f"{result['max_rss_bytes'] / mib:.0f} | {result['first_step_loss']:.4f} | x{speed:.2f} | x{memory:.2f} | "
            f"{result.get('load', float('nan')):.1f} |\n"
        )
    markdown += (
        "\nWithin one precision, the same first-step loss shows that the runs computed the same forward KL on the "
        "same batch.\n"
    )
    write_result(
        options.result_name,
        markdown,
        {"runs": {"_".join(map(str, variant)): runs for variant, runs in rounds.items()}, "ratios": ratios},
    )


if __name__ == "__main__":
    main()
