"""A teacher behind llama.cpp's OpenAI-compatible server vs hf_interop's in-process teacher, one run, same CPU.

Teacher: SmolLM2-135M-Instruct; the server (llama-cpp-python, `--logits_all true`) serves the embedded Q4_1 GGUF,
the in-process teacher is the same GGUF dequantised to float32. Same texts (builtin corpus, validation blocks),
same k. Parts:

1. The server alone: raw completions requests (`echo`, `logprobs=k`, no parsing) one at a time, then `concurrency`
   at once: tokens/s, and the concurrency it sustains (throughput ratio).
2. Capture: `cache_teacher_logits(URL)` (the client: requests in flight, parsing, shards) vs the server alone x
   sustained concurrency (target >= 0.9), and vs `cache_teacher_logits(in-process teacher)`. Parts 1 and 2
   alternate `--repeats` times, so a load that changes during the run hits every variant alike.
3. Agreement (the quantisation bound): per kept entry, |served log-prob - in-process log-prob| (mean, p99, max),
   top-1 agreement, positions without an answer, ambiguous strings dropped.
4. Online KD step time: a student built from 10 of the teacher's layers, batch `--batch` rows; the student's step
   alone (from the captured cache), the teacher's answer time for one batch (sequential requests), and the step
   with the served teacher (prefetch overlaps them): target step <= 1.2 x max(student step, teacher time). The
   in-process online-KD step is given for comparison.

Run: `python benchmarks/bench_served_teacher.py` (about 10 minutes on the 2-core CPU machine: llama-cpp-python
spends about 0.2 s of Python per prompt token, sorting the whole vocabulary at every position).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import cpu_flags_description, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="validation blocks captured")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="rows per online-KD step")
    parser.add_argument("--steps", type=int, default=2, help="online-KD steps timed (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repetitions of the capture measurements")
    args = parser.parse_args()

    import requests
    import torch
    from llama_cpp_server import LlamaCppServer

    from hf_interop import (
        DistillationConfig,
        DistillationTrainer,
        ServedTeacher,
        cache_teacher_logits,
        init_student_from_teacher,
        load_builtin_corpus,
        pack_dataset,
    )
    from hf_interop.distill.teacher_cache.format import PAD_LOGPROB
    from hf_interop.loading import default_teacher_path, load_causal_lm

    torch.manual_seed(0)
    teacher, tokenizer = load_causal_lm(str(default_teacher_path()), dtype="float32")
    blocks = pack_dataset(load_builtin_corpus(), tokenizer, block_size=args.block_size)["validation"]
    rows = blocks.select(range(args.rows))
    steps_rows = blocks.select(range(args.rows, args.rows + args.batch * (args.steps + 1)))
    texts = [
        tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in rows["input_ids"]
    ]
    num_tokens = sum(len(r) for r in rows["input_ids"])
    work = Path(tempfile.mkdtemp(prefix="bench_served_"))
    server = LlamaCppServer(work / "server.log", n_ctx=max(512, 2 * args.block_size)).start()
    results: dict = {"rows": args.rows, "block_size": args.block_size, "top_k": args.top_k}
    try:
        # 1. the server alone
        def raw(text: str) -> None:
            payload = {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": args.top_k, "temperature": 0.0}
            requests.post(server.url + "/completions", json=payload, timeout=3600).raise_for_status()

        raw(texts[0][:50])  # warm-up
        client = ServedTeacher(server.url, top_k=args.top_k, concurrency=args.concurrency).connect(tokenizer)

        def throughput(run) -> float:
            start = time.perf_counter()
            run()
            return num_tokens / (time.perf_counter() - start)

        def capture(source, folder):
            return cache_teacher_logits(
                source, rows, work / folder, top_k=args.top_k, tokenizer=tokenizer, show_progress=False
            )

        def parallel_raw() -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(raw, texts))

        # parts 1 and 2 alternate (server alone, server x concurrency, our capture, in-process), `--repeats` times,
        # so a load that changes during the run hits every variant alike; medians and per-repeat ratios are reported
        measured: dict[str, list[float]] = {"single": [], "parallel": [], "capture": [], "in_process": []}
        for rep in range(args.repeats):
            measured["single"].append(throughput(lambda: [raw(text) for text in texts]))
            measured["parallel"].append(throughput(parallel_raw))
            measured["capture"].append(throughput(lambda rep=rep: capture(client, f"served{rep}")))
            measured["in_process"].append(throughput(lambda rep=rep: capture(teacher, f"native{rep}")))
        served = capture(client, "served0")  # complete: loaded, nothing asked again
        single, parallel = float(np.median(measured["single"])), float(np.median(measured["parallel"]))
        ratios = [
            c / max(a, b)
            for c, a, b in zip(measured["capture"], measured["single"], measured["parallel"], strict=True)
        ]
        results.update(
            server_tokens_per_s=single,
            server_parallel_tokens_per_s=parallel,
            sustained=max(1.0, parallel / single),
            capture_tokens_per_s=float(np.median(measured["capture"])),
            in_process_tokens_per_s=float(np.median(measured["in_process"])),
            capture_ratio=float(np.median(ratios)),
            measured=measured,
        )

        # 3. agreement with the in-process teacher
        differences, agreements, missing, positions = [], [], 0, 0
        for row in range(args.rows):
            ids = np.array(served.dataset[row]["teacher_topk_ids"]).reshape(-1, args.top_k)
            values = np.array(served.dataset[row]["teacher_topk_logprobs"], dtype=np.float64).reshape(-1, args.top_k)
            with torch.no_grad():
                reference = torch.log_softmax(
                    teacher(input_ids=torch.tensor([rows[row]["input_ids"]])).logits[0, :-1].double(), -1
                )
            kept = values > PAD_LOGPROB / 2
            answered = kept.any(-1)
            missing += int((~answered).sum())
            positions += len(values)
            differences.append(np.abs(values[kept] - reference.gather(-1, torch.from_numpy(ids)).numpy()[kept]))
            agreements.append(ids[answered, 0] == reference.argmax(-1).numpy()[answered])
        differences = np.concatenate(differences)
        results.update(
            mean_abs_logprob_difference=float(differences.mean()),
            p99_abs_logprob_difference=float(np.quantile(differences, 0.99)),
            max_abs_logprob_difference=float(differences.max()),
            top1_agreement=float(np.concatenate(agreements).mean()),
            missing_positions=missing,
            positions=positions,
            dropped_entries=client.statistics["dropped_entries"],
            kept_entries=int(differences.size),
        )

        # 4. online KD: student step, teacher answer time, served step, in-process step
        student_base = init_student_from_teacher(teacher, num_layers=10)
        step_cache = cache_teacher_logits(
            teacher, steps_rows, work / "steps", top_k=args.top_k, tokenizer=tokenizer, show_progress=False
        )

        def timed_run(name: str, **teacher_settings) -> float:
            import copy

            from transformers import TrainerCallback

            class StepTimer(TrainerCallback):
                def __init__(self) -> None:
                    self.times: list[float] = []

                def on_step_begin(self, *unused, **kwargs) -> None:
                    self.start = time.perf_counter()

                def on_step_end(self, *unused, **kwargs) -> None:
                    self.times.append(time.perf_counter() - self.start)

            timer = StepTimer()
            config = DistillationConfig(
                output_dir=str(work / name), max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
                learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=1, kd_ratio=1.0, **teacher_settings,
            )  # fmt: skip
            trainer = DistillationTrainer(
                model=copy.deepcopy(student_base), args=config, train_dataset=steps_rows, processing_class=tokenizer,
                callbacks=[timer], **({"teacher_model": teacher} if name == "in_process" else {}),
            )  # fmt: skip
            trainer.train()
            waits = [entry.get("teacher_wait_seconds", 0.0) for entry in trainer.state.log_history if "loss" in entry]
            timed_waits[name] = float(np.median(waits[1:])) if len(waits) > 1 else 0.0
            return float(np.median(timer.times[1:]))

        timed_waits: dict[str, float] = {}
        student_step = timed_run("student_only", teacher_logits_path=str(step_cache.path))
        teacher_batch_seconds = []
        for step in range(args.steps):
            batch = steps_rows.select(range(step * args.batch, (step + 1) * args.batch))["input_ids"]
            start = time.perf_counter()
            for row in batch:
                client.row_topk(row)
            teacher_batch_seconds.append(time.perf_counter() - start)
        teacher_time = float(np.median(teacher_batch_seconds))
        served_step = timed_run(
            "served", teacher_url=server.url, teacher_top_k=args.top_k, teacher_concurrency=args.concurrency
        )
        in_process_step = timed_run("in_process")
        results.update(
            student_step_s=student_step,
            teacher_batch_s=teacher_time,
            served_step_s=served_step,
            in_process_step_s=in_process_step,
            overlap_ratio=served_step / max(student_step, teacher_time),
            served_wait_s=timed_waits.get("served", 0.0),
        )
    finally:
        server.stop()

    r = results
    markdown = f"""{cpu_flags_description()}

Teacher SmolLM2-135M-Instruct: llama.cpp server = llama-cpp-python 0.3.36 serving the Q4_1 GGUF (`--logits_all
true`, 2 threads); in-process = the same GGUF dequantised to float32. {r["rows"]} validation blocks of
{r["block_size"]} tokens, top-{r["top_k"]}, client concurrency {args.concurrency}.

| capture | tokens/s | ratio |
|---|---:|---:|
| server alone, 1 request at a time (no parsing) | {r["server_tokens_per_s"]:.1f} | 1.00 |
| server alone, {args.concurrency} at once (sustained concurrency {r["sustained"]:.2f}) | {r["server_parallel_tokens_per_s"]:.1f} | {r["server_parallel_tokens_per_s"] / r["server_tokens_per_s"]:.2f} |
| `cache_teacher_logits(URL)` (client + shards) | {r["capture_tokens_per_s"]:.1f} | {r["capture_ratio"]:.2f} of server x sustained (median of per-repeat ratios; target >= 0.9) |
| `cache_teacher_logits(in-process teacher)` | {r["in_process_tokens_per_s"]:.1f} | {r["in_process_tokens_per_s"] / r["capture_tokens_per_s"]:.1f}x the served capture |

Agreement with the in-process teacher ({r["kept_entries"]} kept entries): mean |Δ log-prob| {r["mean_abs_logprob_difference"]:.3f}
nats, p99 {r["p99_abs_logprob_difference"]:.3f}, max {r["max_abs_logprob_difference"]:.3f}; top-1 agreement
{r["top1_agreement"]:.3f}; positions without an answer {r["missing_positions"]} of {r["positions"]} (each row's
first: llama-cpp-python reports no distribution there); ambiguous token strings dropped {r["dropped_entries"]}.

| online KD, batch {args.batch} x {r["block_size"]} tokens, student = 10 of the teacher's 30 layers | seconds/step |
|---|---:|
| student step alone (KD from a cache) | {r["student_step_s"]:.2f} |
| served teacher's answers for one batch (sequential) | {r["teacher_batch_s"]:.2f} |
| step with the served teacher (answers prefetched) | {r["served_step_s"]:.2f} ({r["overlap_ratio"]:.2f}x max of the two; target <= 1.2); waiting for answers {r["served_wait_s"]:.2f} of it |
| step with the in-process float32 teacher | {r["in_process_step_s"]:.2f} |
"""
    write_result("served_teacher", markdown, results)


if __name__ == "__main__":
    main()
