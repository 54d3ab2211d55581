"""Multi-task training on real text: SmolLM2-135M-Instruct with LoRA on two LM domains plus a domain classifier.

Tasks: `python_docs` (Python's language reference) and `fortunes` (Debian's fortunes) as causal-LM tasks, and
`domain` (which of the two a paragraph comes from, first 48 tokens, 2 classes) with a classification head. Texts
come from `recipes/smollm2-135m_merge_domains/prepare_texts.py` (train / eval documents split by index).

1. Overhead: one training step (forward + backward) of `MultiTaskTrainer` (static weighting, the drawn task's batch)
   vs `transformers.Trainer` on the same LoRA model and the same batch, interleaved, median of the rounds.
2. Quality: every variant starts from the same base and LoRA initialisation and trains STEPS optimizer steps
   (batch 4): each task alone, then all three with static weights (temperature sampling, T=2), uncertainty weighting
   and PCGrad (`task_sampling="all"`: PCGrad's steps hold a batch of every task, so it sees 3x the rows of the
   others at the same step count: the three single-task runs' total). Then static and uncertainty weighting with
   round-robin sampling for 3 x STEPS steps: each task gets exactly the steps it had alone, and the total equals the
   three single-task runs together. Held-out: perplexity per LM domain, accuracy of the classifier.

Run: `python benchmarks/bench_multitask.py [TEXTS_DIR]` (a few minutes on 2 idle CPU cores; `BENCH_MULTITASK_STEPS`,
`BENCH_MULTITASK_ROUNDS`; `BENCH_MULTITASK_PARTS=overhead` skips the quality study; `BENCH_MULTITASK_MODEL=tiny`
times a 2-layer Llama on the same tokenizer and text, where the trainer's own per-step cost weighs most).
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

STEPS = int(os.environ.get("BENCH_MULTITASK_STEPS", 24))
BATCH, BLOCK, CLASS_TOKENS = 4, 64, 48
OVERHEAD_ROUNDS = int(os.environ.get("BENCH_MULTITASK_ROUNDS", 6))
TASKS = ("python_docs", "fortunes", "domain")
MODEL = os.environ.get("BENCH_MULTITASK_MODEL", "smollm2")  # "tiny": a 2-layer Llama on SmolLM2's tokenizer
PARTS = os.environ.get("BENCH_MULTITASK_PARTS", "overhead,quality")


def _load_tasks(texts: Path, tokenizer):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_interop.cli.multitask import _classification_rows, _lm_blocks

    domains = ("python_docs", "fortunes")
    train = {d: _lm_blocks(texts / d / "train.txt", tokenizer, BLOCK, 256) for d in domains}
    evals = {d: _lm_blocks(texts / d / "eval.txt", tokenizer, BLOCK, 16) for d in domains}
    train["domain"] = _classification_rows({d: texts / d / "train.txt" for d in domains}, tokenizer, CLASS_TOKENS, 256)
    evals["domain"] = _classification_rows({d: texts / d / "eval.txt" for d in domains}, tokenizer, CLASS_TOKENS, 48)
    return train, evals


def _config(output_dir: str, **overrides):
    from hf_interop import MultiTaskConfig

    settings = dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=2,
        logging_steps=STEPS,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        log_variance_learning_rate=0.05,
    )
    settings.update(overrides)
    return MultiTaskConfig(**settings)


def _lora_model(base, with_head: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_interop import MultiTaskModel

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    backbone = get_peft_model(copy.deepcopy(base), lora)
    heads = {"domain": {"type": "classification", "num_labels": 2}} if with_head else None
    return MultiTaskModel(backbone, heads)


def overhead(base, tokenizer, train) -> dict:
    """Median seconds of one training step: plain Trainer vs MultiTaskTrainer, same model and batch, interleaved."""
    from transformers import Trainer, TrainingArguments

    from hf_interop import MultiTaskTrainer

    model = _lora_model(base, with_head=False)
    multitask = MultiTaskTrainer(
        model=model,
        args=_config("/tmp/bench_multitask_overhead"),
        train_dataset={"python_docs": train["python_docs"]},
        processing_class=tokenizer,
    )
    plain = Trainer(
        model=model.backbone,
        args=TrainingArguments("/tmp/bench_multitask_overhead_plain", report_to="none", use_cpu=True),
    )
    rows = [train["python_docs"][i] for i in range(BATCH)]
    nested = multitask.data_collator([{**row, "task_id": 0} for row in rows])
    batch = nested["task_batches"]["python_docs"]
    for trainer in (plain, multitask):  # set by the training loop, which training_step alone does not enter
        trainer.current_gradient_accumulation_steps = 1
    times = {"Trainer": [], "MultiTaskTrainer": []}
    for _ in range(OVERHEAD_ROUNDS + 1):  # the first round warms up
        for name, trainer, inputs in (("Trainer", plain, batch), ("MultiTaskTrainer", multitask, nested)):
            model.zero_grad()
            start = time.perf_counter()
            trainer.training_step(trainer.model, inputs)
            times[name].append(time.perf_counter() - start)
    model.zero_grad()
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    return {**medians, "ratio": medians["MultiTaskTrainer"] / medians["Trainer"]}


def quality(base, tokenizer, train, evals) -> list[dict]:
    from hf_interop import MultiTaskTrainer

    variants = [
        ("python_docs alone", ["python_docs"], {}),
        ("fortunes alone", ["fortunes"], {}),
        ("domain alone", ["domain"], {}),
        ("static (T=2)", list(TASKS), dict(task_sampling="temperature", sampling_temperature=2.0)),
        ("uncertainty (T=2)", list(TASKS), dict(task_sampling="temperature", task_weighting="uncertainty")),
        ("pcgrad (all tasks)", list(TASKS), dict(task_sampling="all", task_weighting="pcgrad")),
        # equal total steps with the three single-task runs together: every task gets its STEPS, one task per step
        (
            f"static, round robin, {len(TASKS)} x {STEPS} steps",
            list(TASKS),
            dict(task_sampling="round_robin", max_steps=len(TASKS) * STEPS, logging_steps=len(TASKS) * STEPS),
        ),
        (
            f"uncertainty, round robin, {len(TASKS)} x {STEPS} steps",
            list(TASKS),
            dict(
                task_sampling="round_robin",
                task_weighting="uncertainty",
                max_steps=len(TASKS) * STEPS,
                logging_steps=len(TASKS) * STEPS,
            ),
        ),
    ]
    results = []
    for name, tasks, options in variants:
        model = _lora_model(base, with_head="domain" in tasks)
        trainer = MultiTaskTrainer(
            model=model,
            args=_config(f"/tmp/bench_multitask_{len(results)}", **options),
            train_dataset={task: train[task] for task in tasks},
            eval_dataset={task: evals[task] for task in tasks},
            processing_class=tokenizer,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
        row = {
            "variant": name,
            "train_seconds": seconds,
            "steps_drawn": dict(zip(tasks, trainer.steps_drawn, strict=True)),
        }
        for task in tasks:
            key = "accuracy" if task == "domain" else "perplexity"
            row[task] = metrics[f"eval_{task}_{key}"]
        print(row, flush=True)
        results.append(row)
    return results


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    import torch

    from hf_interop import load_default_teacher

    texts = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/texts")
    if not (texts / "fortunes" / "train.txt").is_file():
        script = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m_merge_domains" / "prepare_texts.py"
        subprocess.run([sys.executable, str(script), str(texts)], check=True)
    torch.manual_seed(0)
    base, tokenizer = load_default_teacher(dtype=torch.float32)
    if MODEL == "tiny":  # the same tokenizer and text on a 2-layer, hidden-64 Llama: the trainer's own cost shows most
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=base.config.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        base = LlamaForCausalLM(config)
    train, evals = _load_tasks(texts, tokenizer)
    load_before = _load_average()
    cost = overhead(base, tokenizer, train)
    print(cost, flush=True)
    rows = quality(base, tokenizer, train, evals) if "quality" in PARTS else []
    load_after = _load_average()
    if not rows:
        write_result(
            f"multitask_overhead_{MODEL}",
            f"Load average before: {load_before}; after: {load_after}. Model: {MODEL}. Median of {OVERHEAD_ROUNDS} "
            f"interleaved rounds, batch {BATCH}x{BLOCK}: Trainer {cost['Trainer']:.4f} s, MultiTaskTrainer "
            f"{cost['MultiTaskTrainer']:.4f} s, ratio {cost['ratio']:.3f}.",
            {"overhead": cost, "model": MODEL, "load": [load_before, load_after]},
        )
        return
    singles = {task: next(r[task] for r in rows if r["variant"] == f"{task} alone") for task in TASKS}

    def cell(row, task):
        if task not in row:
            return "-"
        value, alone = row[task], singles[task]
        if task == "domain":
            return f"{value:.3f} ({value - alone:+.3f})" if "alone" not in row["variant"] else f"{value:.3f}"
        change = (value / alone - 1) * 100
        return f"{value:.2f} ({change:+.1f}%)" if "alone" not in row["variant"] else f"{value:.2f}"

    lines = [
        f"Load average (1/5/15 min) before: {load_before}; after: {load_after}. SmolLM2-135M-Instruct float32, LoRA r=8 on "
        f"q_proj/v_proj, batch {BATCH}, LM blocks of {BLOCK} tokens, classifier on {CLASS_TOKENS} tokens.",
        "",
        "### Step overhead (static weighting, same LoRA model, same batch of python_docs blocks)",
        "",
        "| trainer | median step (s) | ratio |",
        "|---|---|---|",
        f"| transformers.Trainer | {cost['Trainer']:.3f} | 1.00 |",
        f"| MultiTaskTrainer | {cost['MultiTaskTrainer']:.3f} | {cost['ratio']:.3f} |",
        "",
        f"### Held-out scores ({STEPS} optimizer steps per variant unless the name says otherwise)",
        "",
        "Perplexity (lower is better; change vs. that task trained alone) and domain accuracy (higher is better; "
        "difference vs. alone). Steps per task drawn by the sampler in brackets of the JSON.",
        "",
        "| variant | python_docs ppl | fortunes ppl | domain accuracy | train s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = " | ".join(cell(row, task) for task in TASKS)
        lines.append(f"| {row['variant']} | {cells} | {row['train_seconds']:.0f} |")
    write_result(
        "multitask",
        "\n".join(lines),
        {"overhead": cost, "quality": rows, "steps": STEPS, "load": [load_before, load_after]},
    )


if __name__ == "__main__":
    main()
