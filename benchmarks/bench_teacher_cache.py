"""Offline teacher logits: cache size and coverage by top-k, step time and held-out perplexity vs online KD.

Teacher: the real SmolLM2-135M-Instruct (float32, vocabulary 49,152). Data: the builtin corpus packed into
128-token blocks (a subset of the train split, stated in the table). Three parts, one run:

1. Size and coverage for k in {8, 32, 64, 128}: `cache_teacher_logits` on the same blocks, then
   `TeacherLogitsCache.report`: bytes on disk per token (every file of the folder, manifest included), mean top-k
   probability mass, KL(full || sparse) (sparse = stored top-k + tail mass spread evenly over the other tokens) and
   the k+1-bucket KL (float16 storage error only). The teacher's logits are kept in memory between the four caches
   (same values, one forward per block).
2. Step time of one student (a small random Llama sharing the teacher's tokenizer: hidden 256, 4 layers, tied
   49,152-token embeddings, about 15M parameters) trained on the same batches with cross-entropy only
   (`transformers.Trainer`), KD from the k=64 cache (`DistillationTrainer`, `teacher_logits_path`; the default
   chunked loss and the dense one, `loss_chunk_size=0`) and online full-vocabulary KD (`DistillationTrainer`, live
   teacher); forward KL, `kd_ratio=1`, temperature 1. Step time is the Trainer's optimizer step (callback), which
   excludes data loading; the cache's own collate cost is timed separately and added.
3. Held-out perplexity (validation blocks) of the students after the same number of steps.

Run: `python benchmarks/bench_teacher_cache.py` (about 5-8 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from _common import time_call, write_result

BLOCK_SIZE = 128
BATCH_SIZE = 4
TOP_KS = (8, 32, 64, 128)


class _MemoTeacher:
    """Wraps the teacher; remembers each row's logits so the four caches of part 1 run the teacher once per block."""

    def __init__(self, teacher):
        import torch

        self.teacher = teacher
        self.config = teacher.config
        self.name_or_path = getattr(teacher, "name_or_path", "")
        self.dtype = torch.float32
        self.memo: dict[tuple[int, ...], object] = {}
        self.forwards = 0

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None):
        import torch
        from transformers.modeling_outputs import CausalLMOutput

        keys = [tuple(row.tolist()) for row in input_ids]
        if not all(key in self.memo for key in keys):
            self.forwards += 1
            with torch.no_grad():
                logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            for key, row in zip(keys, logits, strict=True):
                self.memo[key] = row.clone()
        return CausalLMOutput(logits=torch.stack([self.memo[key] for key in keys]))


class _StepTimer:
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


def size_and_coverage(teacher, tokenizer, rows, work_dir: Path, sample_rows: int) -> list[dict]:
    from hf_interop import cache_teacher_logits
    from hf_interop.loading import DEFAULT_TEACHER_HUB_ID

    memo = _MemoTeacher(teacher)
    results = []
    for top_k in TOP_KS:
        start = time.perf_counter()
        cache = cache_teacher_logits(
            memo,
            rows,
            work_dir / f"cache_k{top_k}",
            top_k=top_k,
            batch_size=8,
            tokenizer=tokenizer,
            teacher_name_or_path=DEFAULT_TEACHER_HUB_ID,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        report = cache.report(sample_rows=sample_rows, teacher=memo, dataset=rows)
        report["seconds"] = seconds
        results.append(report)
        print(f"k={top_k}: {report}", flush=True)
    return results


def train_three_ways(teacher, tokenizer, student, train_rows, validation_rows, cache_dir: Path, work_dir: Path, steps):
    from transformers import Trainer, TrainingArguments

    from hf_interop import DistillationConfig, DistillationTrainer, TeacherLogitsCache, evaluate_perplexity
    from hf_interop.distillation_trainer import _PaddingCollator

    common = dict(
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kd = dict(loss_type="forward_kl", kd_ratio=1.0, temperature=1.0)
    results = {}
    for variant in ("ce_only", "cache_k64", "cache_k64_dense", "online_kd"):
        model = copy.deepcopy(student)
        timer = _StepTimer()
        collator = _PaddingCollator(tokenizer.pad_token_id)
        output_dir = str(work_dir / variant)
        if variant == "ce_only":
            trainer = Trainer(
                model=model,
                args=TrainingArguments(output_dir=output_dir, **common),
                train_dataset=train_rows,
                data_collator=collator,
                callbacks=[timer.callback],
            )
        elif variant.startswith("cache_k64"):
            chunking = {"loss_chunk_size": 0} if variant.endswith("dense") else {}
            trainer = DistillationTrainer(
                model=model,
                args=DistillationConfig(
                    output_dir=output_dir, teacher_logits_path=str(cache_dir), **kd, **chunking, **common
                ),
                train_dataset=train_rows,
                processing_class=tokenizer,
                data_collator=collator,
                callbacks=[timer.callback],
            )
        else:
            trainer = DistillationTrainer(
                model=model,
                teacher_model=teacher,
                args=DistillationConfig(output_dir=output_dir, **kd, **common),
                train_dataset=train_rows,
                processing_class=tokenizer,
                data_collator=collator,
                callbacks=[timer.callback],
            )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        timed = timer.durations[2:]  # two warm-up steps
        perplexity = evaluate_perplexity(model, validation_rows, batch_size=8, show_progress=False)["perplexity"]
        results[variant] = {
            "seconds_per_step_median": statistics.median(timed),
            "seconds_per_step_mean": statistics.fmean(timed),
            "train_wall_seconds": wall,
            "validation_perplexity": perplexity,
        }
        print(f"{variant}: {results[variant]}", flush=True)
        del trainer, model

    # the cache's per-batch collate (not inside the Trainer's step timing)
    cache = TeacherLogitsCache.load(cache_dir)
    attached = cache.attach(train_rows)
    features = [attached[index] for index in range(BATCH_SIZE)]
    collate_seconds = time_call(lambda: cache.collate(features), repeats=5)
    results["cache_k64"]["collate_seconds"] = results["cache_k64_dense"]["collate_seconds"] = collate_seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size_blocks", type=int, default=24, help="blocks of 128 tokens for part 1")
    parser.add_argument("--sample_rows", type=int, default=4, help="rows sampled for KL(full || sparse)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of part 2/3 (batch 4 x 128)")
    parser.add_argument("--validation_blocks", type=int, default=16)
    parser.add_argument("--work_dir", default=None)
    options = parser.parse_args()

    import torch

    from hf_interop import (
        cache_teacher_logits,
        load_builtin_corpus,
        load_default_teacher,
        pack_dataset,
    )
    from hf_interop.loading import DEFAULT_TEACHER_HUB_ID

    torch.manual_seed(0)
    work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="bench_teacher_cache_"))
    teacher, tokenizer = load_default_teacher()
    corpus = load_builtin_corpus()
    train_blocks = pack_dataset(corpus["train"], tokenizer, block_size=BLOCK_SIZE)
    validation_rows = pack_dataset(
        corpus["validation"], tokenizer, block_size=BLOCK_SIZE, max_blocks=options.validation_blocks
    )
    num_train = BATCH_SIZE * options.steps
    train_rows = train_blocks.select(range(num_train))

    # ---- part 1 ----
    size_rows = train_blocks.select(range(options.size_blocks))
    coverage = size_and_coverage(teacher, tokenizer, size_rows, work_dir, options.sample_rows)

    # ---- parts 2 and 3 ----
    start = time.perf_counter()
    cache_teacher_logits(
        teacher,
        train_rows,
        work_dir / "train_cache_k64",
        top_k=64,
        batch_size=8,
        tokenizer=tokenizer,
        teacher_name_or_path=DEFAULT_TEACHER_HUB_ID,
        show_progress=False,
    )
    caching_seconds = time.perf_counter() - start
    from transformers import AutoModelForCausalLM, LlamaConfig

    student = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=teacher.config.vocab_size,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        dtype=torch.float32,
    )
    student_parameters = sum(parameter.numel() for parameter in student.parameters())
    training = train_three_ways(
        teacher, tokenizer, student, train_rows, validation_rows, work_dir / "train_cache_k64", work_dir, options.steps
    )

    # ---- table ----
    markdown = (
        f"Teacher SmolLM2-135M-Instruct (float32, vocabulary 49,152), builtin corpus in {BLOCK_SIZE}-token blocks. "
        "Timings from a 2-core machine shared with other jobs (CPU, float32).\n\n"
        f"**Size and coverage** on the first {options.size_blocks} train blocks "
        f"({options.size_blocks * BLOCK_SIZE} tokens; KL on {options.sample_rows} sampled blocks). Bytes count every "
        "file of the cache folder; per token = per dataset token, per position = per cached prediction "
        f"({BLOCK_SIZE - 1} per block). The tail log-mass is derived from the stored float16 log-probs, not stored.\n\n"
        "| k | bytes/token | bytes/position | payload bytes/position | mean top-k mass | KL(full‖sparse) nats | "
        "KL over k+1 buckets |\n|---|---|---|---|---|---|---|\n"
    )
    for report in coverage:
        markdown += (
            f"| {report['top_k']} | {report['bytes_per_token']:.1f} | {report['bytes_per_position']:.1f} | "
            f"{report['payload_bytes_per_position']} | {report['mean_topk_mass']:.4f} | "
            f"{report['kl_full_to_sparse']:.4f} | {report['kl_buckets']:.2e} |\n"
        )
    ce = training["ce_only"]["seconds_per_step_median"]
    online_ppl = training["online_kd"]["validation_perplexity"]
    collate = training["cache_k64"]["collate_seconds"]
    markdown += (
        f"\n**Training** a random {student_parameters / 1e6:.1f}M-parameter student (hidden 256, 4 layers, the "
        "teacher's tokenizer), "
        f"{options.steps} steps of {BATCH_SIZE} x "
        f"{BLOCK_SIZE} tokens (the first {num_train} train blocks), AdamW lr 1e-3 constant; KD = forward KL, "
        f"kd_ratio 1, T 1. Caching those {num_train} blocks at k=64 took {caching_seconds:.1f} s. Step time = median "
        f"of steps 3..{options.steps} of the Trainer's optimizer step; the cache's collate "
        f"({collate * 1000:.2f} ms per batch, outside the Trainer's step timing) is added to its row. Held-out "
        f"perplexity on {options.validation_blocks} validation blocks.\n\n"
        "| student trained with | s/step | x CE-only step | held-out ppl | x online-KD ppl |\n|---|---|---|---|---|\n"
    )
    for variant, label in (
        ("ce_only", "cross-entropy only"),
        ("cache_k64", "KD from the k=64 cache, chunked loss (default) + collate"),
        ("cache_k64_dense", "KD from the k=64 cache, dense loss + collate"),
        ("online_kd", "online full-vocabulary KD"),
    ):
        seconds = training[variant]["seconds_per_step_median"] + (collate if variant.startswith("cache") else 0.0)
        ppl = training[variant]["validation_perplexity"]
        markdown += f"| {label} | {seconds:.3f} | {seconds / ce:.2f} | {ppl:.2f} | {ppl / online_ppl:.3f} |\n"
    markdown += (
        "\nTargets (issue 4): <= 256 bytes/token at k=64; cache step <= 1.15x CE step; ppl within 2% of online.\n"
    )
    write_result(
        "teacher_cache",
        markdown,
        {"coverage": coverage, "training": training, "caching_seconds": caching_seconds, "options": vars(options)},
    )


if __name__ == "__main__":
    main()
