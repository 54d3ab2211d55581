"""Cross-tokenizer distillation vs cross-entropy only: held-out bits per byte at equal steps.

A GPT-2-tokenizer student (the real 50,257-token GPT-2 vocabulary, random weights: 4 layers, hidden 256) trains on
the builtin corpus for N steps twice, from the same initial weights, on the same batches in the same order, with the
same optimizer settings:

- **CE**: cross-entropy on its own tokens only (`transformers.Trainer`);
- **KD**: `CrossTokenizerDistillationTrainer` with the real SmolLM2-135M-Instruct teacher (49,152-token vocabulary):
  `kd_ratio` x the hybrid span-aligned loss (forward KL over the matched vocabulary on matched spans, ULD on the
  rest) + (1 - `kd_ratio`) x the same cross-entropy.

Both students, the untrained student and the teacher are scored on the validation split in bits per byte (total
negative log-likelihood in bits / UTF-8 bytes of the evaluated text), the unit that compares models with different
tokenizers. Target: KD reaches fewer bits per byte than CE.

Run: `python benchmarks/bench_cross_tokenizer.py [--steps 60]` (about 6 minutes on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from _common import PeakRSS, write_result

BLOCK_TOKENS = 64  # student tokens per training row (the start token comes on top)


def _student(gpt2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=len(gpt2_tokenizer),
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=256,
        bos_token_id=gpt2_tokenizer.eos_token_id,
        eos_token_id=gpt2_tokenizer.eos_token_id,
        pad_token_id=gpt2_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def bits_per_byte(model, tokenizer, texts: list[str], start_token_id: int, batch_size: int = 8) -> float:
    """Total NLL (bits) of every token of `texts`, each scored after `start_token_id`, / their UTF-8 bytes."""
    import torch

    model.eval()
    total_bits, total_bytes = 0.0, 0
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = [[start_token_id, *ids] for ids in encoded[start : start + batch_size]]
            length = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), length), start_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for index, row in enumerate(rows):
                input_ids[index, : len(row)] = torch.tensor(row)
                mask[index, : len(row)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].double()
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
            total_bits += nll.item() / math.log(2)
        total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return total_bits / total_bytes


class _StudentOnly:
    """The cross-tokenizer collator's student tensors only: the CE run sees exactly the KD run's batches."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        return {name: batch[name] for name in ("input_ids", "attention_mask", "labels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--kd_ratio", type=float, default=0.5)
    parser.add_argument("--eval_texts", type=int, default=32, help="validation chunks scored")
    options = parser.parse_args()

    import torch
    from transformers import Trainer, TrainingArguments

    from hf_interop import (
        CrossTokenizerDistillationConfig,
        CrossTokenizerDistillationTrainer,
        load_builtin_corpus,
        load_default_teacher,
        load_gpt2_tokenizer,
    )
    from hf_interop.distill.cross_tokenizer_collator import CrossTokenizerDistillationCollator
    from hf_interop.text_alignment import split_texts_into_chunks

    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = load_builtin_corpus()
    gpt2_tokenizer = load_gpt2_tokenizer()
    teacher, teacher_tokenizer = load_default_teacher()
    train = split_texts_into_chunks(corpus["train"], gpt2_tokenizer, max_tokens=BLOCK_TOKENS)
    validation = split_texts_into_chunks(corpus["validation"], gpt2_tokenizer, max_tokens=BLOCK_TOKENS)
    eval_texts = list(validation["text"][: options.eval_texts])
    eos = gpt2_tokenizer.eos_token_id
    teacher_start = teacher_tokenizer.convert_tokens_to_ids("<|endoftext|>")

    common = dict(
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, options.steps // 10),
        weight_decay=0.0,
        seed=0,
        data_seed=0,
        logging_steps=max(1, options.steps // 6),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    results = {}
    untrained = _student(gpt2_tokenizer)
    results["untrained student"] = {"bpb": bits_per_byte(untrained, gpt2_tokenizer, eval_texts, eos)}
    results["teacher (SmolLM2-135M)"] = {
        "bpb": bits_per_byte(teacher, teacher_tokenizer, eval_texts, teacher_start, batch_size=4)
    }
    with tempfile.TemporaryDirectory() as tmp:
        # ---- CE only ----
        student = _student(gpt2_tokenizer)
        collator = CrossTokenizerDistillationCollator(
            gpt2_tokenizer, teacher_tokenizer, max_length=BLOCK_TOKENS + 1, teacher_start_token="<|endoftext|>"
        )
        args = TrainingArguments(output_dir=f"{tmp}/ce", remove_unused_columns=False, **common)
        trainer = Trainer(model=student, args=args, train_dataset=train, data_collator=_StudentOnly(collator))
        start = time.perf_counter()
        with PeakRSS() as peak:
            trainer.train()
        results["CE only"] = {
            "bpb": bits_per_byte(student, gpt2_tokenizer, eval_texts, eos),
            "seconds": time.perf_counter() - start,
            "peak_rss_mib": peak.delta / 2**20,
        }
        ce_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        del trainer, student

        # ---- cross-tokenizer KD ----
        student = _student(gpt2_tokenizer)
        args = CrossTokenizerDistillationConfig(
            output_dir=f"{tmp}/kd",
            kd_ratio=options.kd_ratio,
            max_length=BLOCK_TOKENS + 1,
            teacher_start_token="<|endoftext|>",
            **common,
        )
        trainer = CrossTokenizerDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train,
            processing_class=gpt2_tokenizer,
            teacher_processing_class=teacher_tokenizer,
        )
        start = time.perf_counter()
        with PeakRSS() as peak:
            trainer.train()
        kd_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results["cross-tokenizer KD"] = {
            "bpb": bits_per_byte(student, gpt2_tokenizer, eval_texts, eos),
            "seconds": time.perf_counter() - start,
            "peak_rss_mib": peak.delta / 2**20,
            "matched_span_fraction": sum(entry["matched_span_fraction"] for entry in kd_logs) / len(kd_logs),
        }

    ce, kd = results["CE only"], results["cross-tokenizer KD"]
    eval_bytes = sum(len(text.encode("utf-8")) for text in eval_texts)
    lines = [
        f"GPT-2-tokenizer student (4 layers, hidden 256, vocabulary 50,257, random init), {options.steps} steps of "
        f"batch {options.batch_size} x {BLOCK_TOKENS} tokens, lr {options.learning_rate} (cosine), same batches for "
        f"both runs; KD: SmolLM2-135M-Instruct teacher (vocabulary 49,152), kd_ratio {options.kd_ratio}, hybrid loss "
        f"(forward KL on matched spans, ULD on unmatched spans; {kd['matched_span_fraction']:.1%} of aligned spans "
        f"matched). Held-out: {len(eval_texts)} validation chunks, {eval_bytes:,} bytes. Shared machine: other jobs "
        "ran at the same time, so times are indicative.",
        "",
        "| model | held-out bits/byte | train time (s) | peak RSS above start (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in results.items():
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
        lines.append(f"| {name} | {row['bpb']:.3f} | {seconds} | {rss} |")
    lines += [
        "",
        f"KD / CE bits per byte: **{kd['bpb'] / ce['bpb']:.3f}** (target < 1: "
        f"{'met' if kd['bpb'] < ce['bpb'] else 'NOT met'}); KD / CE train time: {kd['seconds'] / ce['seconds']:.1f}x "
        "(the teacher forward and the alignment).",
    ]
    write_result(
        "cross_tokenizer",
        "\n".join(lines),
        {"options": vars(options), "results": results, "ce_logs": ce_logs, "kd_logs": kd_logs},
    )


if __name__ == "__main__":
    main()
