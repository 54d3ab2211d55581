"""Offline teacher logits: cache size and coverage by top-k, step time and held-out perplexity vs online KD.

Teacher: the real SmolLM2-135M-Instruct (float32, vocabulary 49,152). Data: the builtin corpus packed into
128-token blocks (a subset of the train split, stated in the table). Five parts, one run:

1. Size and coverage for k in {8, 32, 64, 128}: `cache_teacher_logits` on the same blocks, then
   `TeacherLogitsCache.report`: bytes on disk per token (every file of the folder, manifest included), mean top-k
   probability mass, KL(full || sparse) (sparse = stored top-k + tail mass spread evenly over the other tokens) and
   the k+1-bucket KL (float16 storage error only). The teacher's logits are kept in memory between the four caches
   (same values, one forward per block).
2. One k=64 cache of the training blocks (`4 x max(steps)` blocks: only what the training steps draw from).
3. A random student (a small Llama sharing the teacher's tokenizer: hidden 256, 4 layers, tied 49,152-token
   embeddings, about 15M parameters), trained on the same batches (same seed, same sampler) with cross-entropy
   only (`transformers.Trainer`), KD from the k=64 cache (`DistillationTrainer`, `teacher_logits_path`; default
   chunked loss; `sparse_tail="bucket"` and `"teacher_marginal"`; optionally the dense loss, `loss_chunk_size=0`)
   and online full-vocabulary KD (`DistillationTrainer`, live teacher). Step time is the Trainer's optimizer step
   (callback), which excludes data loading; the cache's own collate cost is timed separately and added.
4. A student initialised from the teacher (`init_student_from_teacher`, `--init_layers` of its 30 layers), trained
   for `--init_steps` steps the same ways (cache bucket / cache teacher-marginal / online).
5. Both students again from the k=64 cache (bucket tail) and online, for each `--extra_seeds` data order: the
   cache-vs-online perplexity ratio differs by a few percent between seeds at these step counts, so one seed
   cannot show a 2% target; the table gives every seed and the geometric mean.
Each student's held-out perplexity (validation blocks) after its steps is compared with online KD's at equal steps.
KD = forward KL, temperature 1, `--kd_ratio` (same for every KD run).

Run: `python benchmarks/bench_teacher_cache.py` (about 6 minutes for parts 1-4 on the quieter 2-core CPU machine,
31 on a loaded one; part 5 adds about 3 minutes per extra seed). Smaller: `--steps 10 --init_steps 20 --size_blocks 8` (bytes/token then include more of the
fixed manifest overhead).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

from _common import time_call, write_result

BLOCK_SIZE = 128
BATCH_SIZE = 4
TOP_KS = (8, 32, 64, 128)
VARIANT_LABELS = {
    "ce_only": "cross-entropy only",
    "cache_k64": "KD from the k=64 cache, bucket tail (default), chunked loss + collate",
    "cache_k64_marginal": 'KD from the k=64 cache, `sparse_tail="teacher_marginal"`, chunked loss + collate',
    "cache_k64_dense": "KD from the k=64 cache, bucket tail, dense loss + collate",
    "online_kd": "online full-vocabulary KD",
}


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
            encoding="float16",  # this benchmark measures format version 1; bench_teacher_cache_encodings the rest
        )
        seconds = time.perf_counter() - start
        report = cache.report(sample_rows=sample_rows, teacher=memo, dataset=rows)
        report["seconds"] = seconds
        results.append(report)
        print(f"k={top_k}: {report}", flush=True)
    return results


def train_variants(
    variants, teacher, tokenizer, student, train_rows, validation_rows, cache_dir: Path, work_dir: Path, steps: int,
    learning_rate: float, kd_ratio: float, seed: int = 0,
) -> dict[str, dict]:  # fmt: skip
    """Train a copy of `student` per variant on the same batches (drawn with `seed`); step times and held-out ppl."""
    from transformers import Trainer, TrainingArguments

    from hf_interop import DistillationConfig, DistillationTrainer, evaluate_perplexity
    from hf_interop.distill.collators import _PaddingCollator

    common = dict(
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    kd = dict(loss_type="forward_kl", kd_ratio=kd_ratio, temperature=1.0)
    results = {}
    for variant in variants:
        model = copy.deepcopy(student)
        timer = _StepTimer()
        collator = _PaddingCollator(tokenizer.pad_token_id)
        output_dir = str(work_dir / variant)
        trainer_kwargs = dict(
            model=model, train_dataset=train_rows, data_collator=collator, callbacks=[timer.callback]
        )
        if variant == "ce_only":
            trainer = Trainer(args=TrainingArguments(output_dir=output_dir, **common), **trainer_kwargs)
        elif variant.startswith("cache_k64"):
            options = {"teacher_logits_path": str(cache_dir)}
            if variant.endswith("dense"):
                options["loss_chunk_size"] = 0
            if variant.endswith("marginal"):
                options["sparse_tail"] = "teacher_marginal"
            trainer = DistillationTrainer(
                args=DistillationConfig(output_dir=output_dir, **options, **kd, **common),
                processing_class=tokenizer,
                **trainer_kwargs,
            )
        else:
            trainer = DistillationTrainer(
                teacher_model=teacher,
                args=DistillationConfig(output_dir=output_dir, **kd, **common),
                processing_class=tokenizer,
                **trainer_kwargs,
            )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        timed = timer.durations[2:] or timer.durations  # two warm-up steps
        perplexity = evaluate_perplexity(model, validation_rows, batch_size=8, show_progress=False)["perplexity"]
        results[variant] = {
            "seconds_per_step_median": statistics.median(timed),
            "seconds_per_step_mean": statistics.fmean(timed),
            "train_wall_seconds": wall,
            "validation_perplexity": perplexity,
        }
        print(f"{variant}: {results[variant]}", flush=True)
        del trainer, model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size_blocks", type=int, default=24, help="blocks of 128 tokens for part 1")
    parser.add_argument("--sample_rows", type=int, default=4, help="rows sampled for KL(full || sparse)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the random student (batch 4 x 128)")
    parser.add_argument("--init_steps", type=int, default=40, help="steps of the teacher-initialised student")
    parser.add_argument("--init_layers", type=int, default=6, help="teacher layers the initialised student keeps")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW, constant, both students")
    parser.add_argument("--kd_ratio", type=float, default=1.0, help="weight of KD vs CE in every KD run")
    parser.add_argument("--dense_row", action="store_true", help="also time the dense sparse loss (random student)")
    parser.add_argument("--validation_blocks", type=int, default=16)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument(
        "--extra_seeds", type=int, nargs="*", default=[1, 2],
        help="data-order seeds besides 0 for the cache-vs-online perplexity ratio (bucket tail), both students",
    )  # fmt: skip
    options = parser.parse_args()

    import torch

    from hf_interop import (
        cache_teacher_logits,
        init_student_from_teacher,
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
    num_train = BATCH_SIZE * max(options.steps, options.init_steps)
    train_rows = train_blocks.select(range(num_train))

    # ---- part 1 ----
    size_rows = train_blocks.select(range(options.size_blocks))
    coverage = size_and_coverage(teacher, tokenizer, size_rows, work_dir, options.sample_rows)

    # ---- part 2: the training cache ----
    cache_dir = work_dir / "train_cache_k64"
    start = time.perf_counter()
    cache_teacher_logits(
        teacher,
        train_rows,
        cache_dir,
        top_k=64,
        batch_size=8,
        tokenizer=tokenizer,
        teacher_name_or_path=DEFAULT_TEACHER_HUB_ID,
        show_progress=False,
        encoding="float16",
    )
    caching_seconds = time.perf_counter() - start

    # ---- part 3: random student ----
    from transformers import AutoModelForCausalLM, LlamaConfig

    random_student = AutoModelForCausalLM.from_config(
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
    random_parameters = sum(parameter.numel() for parameter in random_student.parameters())
    random_variants = ["ce_only", "cache_k64", "cache_k64_marginal", *(["cache_k64_dense"] * options.dense_row)]
    training = {
        "random": train_variants(
            [*random_variants, "online_kd"],
            teacher,
            tokenizer,
            random_student,
            train_rows,
            validation_rows,
            cache_dir,
            work_dir / "random",
            options.steps,
            options.learning_rate,
            options.kd_ratio,
        )  # fmt: skip
    }

    # ---- part 4: student from the teacher's layers ----
    from hf_interop import evaluate_perplexity

    init_student = init_student_from_teacher(teacher, num_layers=options.init_layers)
    init_parameters = sum(parameter.numel() for parameter in init_student.parameters())
    init_ppl = evaluate_perplexity(init_student, validation_rows, batch_size=8, show_progress=False)["perplexity"]
    teacher_ppl = evaluate_perplexity(teacher, validation_rows, batch_size=8, show_progress=False)["perplexity"]
    training["teacher_init"] = train_variants(
        ["cache_k64", "cache_k64_marginal", "online_kd"], teacher, tokenizer, init_student, train_rows,
        validation_rows, cache_dir, work_dir / "teacher_init", options.init_steps, options.learning_rate,
        options.kd_ratio,
    )  # fmt: skip

    # ---- part 5: the perplexity ratio over data-order seeds (the seed-0 runs above are the first) ----
    seed_ppl = {
        0: {
            key: {v: training[key][v]["validation_perplexity"] for v in ("cache_k64", "online_kd")} for key in training
        }
    }
    for seed in options.extra_seeds:
        seed_ppl[seed] = {}
        for key, student, steps in (
            ("random", random_student, options.steps),
            ("teacher_init", init_student, options.init_steps),
        ):
            runs = train_variants(
                ["cache_k64", "online_kd"], teacher, tokenizer, student, train_rows, validation_rows, cache_dir,
                work_dir / f"{key}_seed{seed}", steps, options.learning_rate, options.kd_ratio, seed=seed,
            )  # fmt: skip
            seed_ppl[seed][key] = {variant: run["validation_perplexity"] for variant, run in runs.items()}
    del random_student

    # ---- table ----
    markdown = (
        f"Teacher SmolLM2-135M-Instruct (float32, vocabulary 49,152; held-out ppl {teacher_ppl:.2f}), builtin corpus "
        f"in {BLOCK_SIZE}-token blocks. Timings from a 2-core machine shared with other jobs (CPU, float32).\n\n"
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
    from hf_interop import TeacherLogitsCache

    cache = TeacherLogitsCache.load(cache_dir)
    attached = cache.attach(train_rows)
    features = [attached[index] for index in range(BATCH_SIZE)]
    collate = time_call(lambda: cache.collate(features), repeats=5)
    prior_seconds = time_call(lambda: TeacherLogitsCache.load(cache_dir).tail_prior_logprobs(), repeats=1)
    markdown += (
        f"\n**Training.** KD = forward KL, kd_ratio {options.kd_ratio:g}, T 1; AdamW lr {options.learning_rate:g} "
        f"constant; batches of {BATCH_SIZE} x {BLOCK_SIZE} tokens drawn with the same seed from the first {num_train} "
        f'train blocks, whose k=64 cache took {caching_seconds:.1f} s. `sparse_tail="teacher_marginal"` spreads '
        "each position's cached tail mass over the tokens outside its top-k like the teacher's mean distribution "
        f"over the cache (`TeacherLogitsCache.tail_prior_logprobs`, {prior_seconds * 1000:.0f} ms to compute; passed via "
        f"DistillationConfig.sparse_tail). Step time = median of steps 3.. of the Trainer's optimizer step; the cache's "
        f"collate ({collate * 1000:.2f} ms per batch, outside the Trainer's step timing) is added to its rows. "
        f"Held-out perplexity on {options.validation_blocks} validation blocks.\n"
    )
    configurations = (
        (
            "random",
            f"a random {random_parameters / 1e6:.1f}M-parameter student (hidden 256, 4 layers, the teacher's "
            f"tokenizer), {options.steps} steps",
        ),
        (
            "teacher_init",
            f"a {init_parameters / 1e6:.1f}M-parameter student from {options.init_layers} of the teacher's 30 layers "
            f"(`init_student_from_teacher`; held-out ppl {init_ppl:.1f} before training), {options.init_steps} steps",
        ),
    )
    for key, description in configurations:
        rows = training[key]
        ce = rows["ce_only"]["seconds_per_step_median"] if "ce_only" in rows else None
        online_ppl = rows["online_kd"]["validation_perplexity"]
        markdown += (
            f"\n{description[0].upper()}{description[1:]}:\n\n"
            "| student trained with | s/step | x CE-only step | held-out ppl | x online-KD ppl |\n"
            "|---|---|---|---|---|\n"
        )
        for variant, result in rows.items():
            seconds = result["seconds_per_step_median"] + (collate if variant.startswith("cache") else 0.0)
            ratio = f"{seconds / ce:.2f}" if ce else "-"
            ppl = result["validation_perplexity"]
            markdown += (
                f"| {VARIANT_LABELS[variant]} | {seconds:.3f} | {ratio} | {ppl:.2f} | {ppl / online_ppl:.3f} |\n"
            )
    markdown += (
        "\n**Seeds.** Held-out perplexity from the k=64 cache (bucket tail) / online full-vocabulary KD, the same "
        "runs as above with other data-order seeds (`TrainingArguments.seed` and `data_seed`; same initial "
        "weights):\n\n| student | seed | cache ppl | online ppl | x online-KD ppl |\n|---|---|---|---|---|\n"
    )
    seed_ratios: dict[str, list[float]] = {}
    for key, label in (("random", "random"), ("teacher_init", "from teacher layers")):
        for seed, by_student in seed_ppl.items():
            cache_ppl, online = by_student[key]["cache_k64"], by_student[key]["online_kd"]
            seed_ratios.setdefault(key, []).append(cache_ppl / online)
            markdown += f"| {label} | {seed} | {cache_ppl:.2f} | {online:.2f} | {cache_ppl / online:.3f} |\n"
        ratios = seed_ratios[key]
        markdown += (
            f"| {label} | geometric mean of {len(ratios)} | | | "
            f"{math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}) |\n"
        )
    markdown += (
        "\nTargets (issue 4): <= 256 bytes/token at k=64; cache step <= 1.15x CE step; ppl within 2% of online "
        "(x online-KD ppl <= 1.02).\n"
    )
    write_result(
        "teacher_cache",
        markdown,
        {
            "coverage": coverage,
            "training": training,
            "caching_seconds": caching_seconds,
            "collate_seconds": collate,
            "tail_prior_seconds": prior_seconds,
            "teacher_ppl": teacher_ppl,
            "seed_perplexities": {str(seed): value for seed, value in seed_ppl.items()},
            "teacher_init_ppl_before": init_ppl,
            "student_parameters": {"random": random_parameters, "teacher_init": init_parameters},
            "options": vars(options),
        },
    )


if __name__ == "__main__":
    main()
