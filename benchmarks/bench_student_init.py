"""A student initialised from its teacher's layers vs a random student of the same shape, both distilled.

Teacher: the real SmolLM2-135M-Instruct (30 layers). Students: 6 decoder layers, the teacher's widths and
vocabulary; one built with `init_student_from_teacher(teacher, num_layers=6)` (uniform layer selection: embeddings,
layers 0, 6, 12, 17, 23, 29, final norm and head copied), one initialised at random from the same config. Both are
distilled with `hf_interop.DistillationTrainer` (forward KL, kd_ratio 0.5) for the same number of steps, same data
order, same learning rate, on the builtin corpus; held-out perplexity on the validation split before and after.

Run: `python benchmarks/bench_student_init.py [--steps N]` (defaults: 24 steps of 4 x 64 tokens per student; a few
minutes on an idle 2-core CPU, much longer on a shared one).
Target: the teacher-initialised student reaches lower held-out perplexity than the random one at equal steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import write_result


def _distil(student, teacher, tokenizer, train, steps: int, batch_size: int, learning_rate: float, output_dir: str):
    from hf_interop import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        kd_ratio=0.5,
        loss_type="forward_kl",
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_interop import (
        evaluate_perplexity,
        init_student_from_teacher,
        load_builtin_corpus,
        load_default_teacher,
        pack_dataset,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--eval_blocks", type=int, default=32)
    options = parser.parse_args()

    torch.manual_seed(0)
    teacher, tokenizer = load_default_teacher()
    corpus = load_builtin_corpus()
    train = pack_dataset(corpus["train"], tokenizer, block_size=options.block_size)
    held_out = pack_dataset(
        corpus["validation"], tokenizer, block_size=options.block_size, max_blocks=options.eval_blocks
    )

    from_teacher = init_student_from_teacher(teacher, num_layers=options.num_layers, layer_selection="uniform")
    torch.manual_seed(0)
    random_student = AutoModelForCausalLM.from_config(from_teacher.config, dtype=torch.float32)
    shapes_match = all(
        a.shape == b.shape for a, b in zip(from_teacher.parameters(), random_student.parameters(), strict=True)
    )
    num_parameters = sum(parameter.numel() for parameter in from_teacher.parameters())

    def perplexity(model) -> float:
        return evaluate_perplexity(model, held_out, batch_size=8, show_progress=False)["perplexity"]

    teacher_ppl = perplexity(teacher)
    rows = []
    for label, student in (("from teacher layers", from_teacher), ("random init", random_student)):
        before = perplexity(student)
        with tempfile.TemporaryDirectory(prefix="bench_student_init_") as output_dir:
            seconds = _distil(
                student,
                teacher,
                tokenizer,
                train,
                options.steps,
                options.batch_size,
                options.learning_rate,
                output_dir,
            )
        after = perplexity(student)
        rows.append({"student": label, "ppl_before": before, "ppl_after": after, "train_seconds": seconds})
        print(rows[-1], flush=True)

    ratio = rows[1]["ppl_after"] / rows[0]["ppl_after"]
    target_met = rows[0]["ppl_after"] < rows[1]["ppl_after"]
    lines = [
        f"Teacher SmolLM2-135M-Instruct (30 layers, held-out ppl {teacher_ppl:.2f}); students: {options.num_layers} "
        f"layers, {num_parameters / 1e6:.1f}M parameters, same shape (checked: {shapes_match}). Distilled with "
        f"hf_interop.DistillationTrainer (forward KL, kd_ratio 0.5) for {options.steps} steps of "
        f"{options.batch_size} x {options.block_size} tokens, lr {options.learning_rate}, same data order; held-out = "
        f"{len(held_out)} validation blocks of the builtin corpus. Shared machine (timings indicative).",
        "",
        "| student | held-out ppl at step 0 | held-out ppl after | train seconds |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['student']} | {row['ppl_before']:.1f} | {row['ppl_after']:.1f} | {row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Random / teacher-initialised perplexity after {options.steps} steps: {ratio:.1f}x. Target (teacher-initialised "
        f"lower at equal steps): {'met' if target_met else 'NOT met'}.",
    ]
    write_result(
        "student_init",
        "\n".join(lines),
        {"options": vars(options), "teacher_ppl": teacher_ppl, "rows": rows, "target_met": target_met},
    )


if __name__ == "__main__":
    main()
