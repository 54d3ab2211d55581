"""Quality: does distillation beat plain cross-entropy at equal steps?

Teacher: the real SmolLM2-135M-Instruct (float32, 30 layers). Student: 6 of the teacher's layers (uniformly
chosen, with its embeddings, final norm and head) from `init_student_from_teacher`. Two runs from the same student
weights over the same batches of the builtin corpus's train split with identical settings (AdamW, learning rate,
schedule, steps, batch, seed): `DistillationTrainer` (forward KL, `kd_ratio` below) and the plain
`transformers.Trainer` (cross-entropy only). Reported: held-out perplexity on the validation split before training
and after each run, next to the teacher's.

Run: `python benchmarks/bench_distill_quality.py` (about 6-8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time

from _common import write_result

STUDENT_LAYERS = 6
# environment overrides: smoke tests, or a smaller run on a busy machine (the table states what was run)
STEPS = int(os.environ.get("BENCH_QUALITY_STEPS", 60))
BATCH_SIZE = int(os.environ.get("BENCH_QUALITY_BATCH_SIZE", 8))
BLOCK_SIZE = 128
LEARNING_RATE = 2e-4
KD_RATIO = 0.5
TEMPERATURE = 1.0
EVAL_BLOCKS = int(os.environ.get("BENCH_QUALITY_EVAL_BLOCKS", 48))


def _training_arguments(output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def main() -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_interop import (
        DistillationConfig,
        DistillationTrainer,
        evaluate_perplexity,
        init_student_from_teacher,
        load_builtin_corpus,
        load_default_teacher,
        pack_dataset,
    )
    from hf_interop.distill.collators import _PaddingCollator

    torch.manual_seed(0)
    teacher, tokenizer = load_default_teacher()
    corpus = load_builtin_corpus()
    train_rows = pack_dataset(corpus["train"], tokenizer, block_size=BLOCK_SIZE)
    held_out = pack_dataset(corpus["validation"], tokenizer, block_size=BLOCK_SIZE, max_blocks=EVAL_BLOCKS)
    initial_student = init_student_from_teacher(teacher, num_layers=STUDENT_LAYERS)
    collator = _PaddingCollator(tokenizer.pad_token_id)

    def perplexity(model) -> float:
        return evaluate_perplexity(model, held_out, batch_size=8, show_progress=False)["perplexity"]

    teacher_ppl = perplexity(teacher)
    initial_ppl = perplexity(initial_student)
    results = {}
    with tempfile.TemporaryDirectory() as work_dir:
        # plain cross-entropy
        student = copy.deepcopy(initial_student).train()
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**_training_arguments(f"{work_dir}/ce")),
            train_dataset=train_rows,
            data_collator=collator,
        )
        start = time.perf_counter()
        trainer.train()
        results["cross-entropy only (transformers.Trainer)"] = (perplexity(student), time.perf_counter() - start)
        del trainer, student

        # knowledge distillation
        student = copy.deepcopy(initial_student).train()
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(
                loss_type="forward_kl",
                kd_ratio=KD_RATIO,
                temperature=TEMPERATURE,
                **_training_arguments(f"{work_dir}/kd"),
            ),
            train_dataset=train_rows,
            processing_class=tokenizer,
            data_collator=collator,
        )
        start = time.perf_counter()
        trainer.train()
        results[f"distillation (forward KL, kd_ratio {KD_RATIO}, T {TEMPERATURE})"] = (
            perplexity(student),
            time.perf_counter() - start,
        )

    ce_ppl = next(value for name, value in results.items() if name.startswith("cross"))[0]
    kd_ppl = next(value for name, value in results.items() if name.startswith("distillation"))[0]
    tokens = STEPS * BATCH_SIZE * BLOCK_SIZE
    markdown = (
        f"SmolLM2-135M-Instruct teacher -> {STUDENT_LAYERS}-layer student initialised from its layers "
        f"({sum(p.numel() for p in initial_student.parameters()) / 1e6:.1f}M parameters); {STEPS} steps of "
        f"{BATCH_SIZE} x {BLOCK_SIZE} tokens ({tokens:,} tokens) of the builtin corpus, AdamW lr {LEARNING_RATE}, "
        f"cosine schedule, same batches and seed for both runs; held-out perplexity on {len(held_out)} validation "
        "blocks. CPU float32; wall times from a machine shared with other jobs.\n\n"
        "| model | held-out perplexity | training wall time (s) |\n|---|---|---|\n"
        f"| teacher (SmolLM2-135M-Instruct) | {teacher_ppl:.2f} | |\n"
        f"| student before training | {initial_ppl:.2f} | |\n"
    )
    for name, (ppl, seconds) in results.items():
        markdown += f"| student, {name} | {ppl:.2f} | {seconds:.0f} |\n"
    markdown += (
        f"\nKD / CE perplexity: x{kd_ppl / ce_ppl:.3f} ({'KD better' if kd_ppl < ce_ppl else 'CE better'}; "
        f"log-perplexity difference {math.log(ce_ppl) - math.log(kd_ppl):+.3f} nats/token).\n"
    )
    write_result(
        "distill_quality",
        markdown,
        {
            "teacher_perplexity": teacher_ppl,
            "initial_student_perplexity": initial_ppl,
            "results": {name: {"perplexity": ppl, "seconds": seconds} for name, (ppl, seconds) in results.items()},
            "kd_over_ce_perplexity": kd_ppl / ce_ppl,
        },
    )


if __name__ == "__main__":
    main()
