"""Loss kernel: chunked distillation loss vs naive full-logits PyTorch vs TRL's loss functions.

Forward + backward of a distillation loss from final hidden states through an output head (hidden 576, vocab
49,152: SmolLM2's sizes), for forward KL and JSD(beta=0.5), at 1k, 4k and 16k tokens. Every method gets the same
student hidden states (with grad), the same student head (with grad), the same teacher hidden states and head:

- `naive`: full `(tokens, vocab)` logits of both models, then a plain `log_softmax` + `F.kl_div` in PyTorch.
- `trl_gkd`: TRL's `GKDTrainer.generalized_jsd_loss` on those same full logits (beta 0 = forward KL).
- `trl_chunked`: TRL's `DistillationTrainer` chunked loss (`trl.trainer.distillation_trainer._chunked_divergence_loss`,
  a private function; on CPU it runs its PyTorch tile path).
- `hf_interop`: `hf_interop.losses.chunked_distillation_loss` (chunk_size 1024, no CE term, fused backward), eager
  per-chunk ops (`backend="eager"`).
- `hf_compiled`: the same loss with `backend="compiled"`: one `torch.compile`d kernel per chunk (inductor C++ on CPU,
  Triton on CUDA), chunk size `--compiled-chunk-size` (default 256: at 4k tokens that keeps the
  peak under 10% of naive's). Compiled once in the warm-up.
- `hf_liger`: the same loss with `backend="liger"` (Liger-Kernel's fused linear JSD; CUDA only, skipped elsewhere).

Peak memory is the process's peak RSS above the start of the call on CPU (`torch.cuda.max_memory_allocated` on
GPU); time is the wall time of one forward+backward. A dense method whose extrapolated peak exceeds
`--memory-budget-gb` is not run (its memory is then extrapolated linearly from the smallest size, marked `~`), and
cells that would overrun `--time-budget-s` are skipped and say so. On Linux the script re-executes itself with
`MALLOC_MMAP_THRESHOLD_=65536` so that freed memory leaves the process and peak RSS is per cell.

    python benchmarks/bench_losses.py                        # 1k, 4k, 16k tokens
    python benchmarks/bench_losses.py --tokens 1024 4096 --memory-budget-gb 3 --time-budget-s 480
    python benchmarks/bench_losses.py --tokens 1024 4096 16384 --losses jsd --methods naive hf_interop \
        --time-budget-s 600 --result-name losses_jsd_large   # slow machine: the JSD cells the default run skips
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import statistics
import sys
import time

from _common import PeakRSS, write_result

HIDDEN, VOCAB = 576, 49152
METHODS = ("naive", "trl_gkd", "trl_chunked", "hf_interop", "hf_compiled", "hf_liger")
SETTINGS = {"compiled_chunk_size": 512}  # set from the command line
DENSE_METHODS = ("naive", "trl_gkd")
BETA = {"forward_kl": 0.0, "jsd": 0.5}


def build_inputs(num_tokens: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    student_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    teacher_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5)
        teacher_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) * 2 / HIDDEN**0.5)
    student_head.to(device)
    teacher_head.to(device)
    student_hidden = torch.randn(num_tokens, HIDDEN, generator=generator).to(device).requires_grad_()
    teacher_hidden = torch.randn(num_tokens, HIDDEN, generator=generator).to(device)
    labels = torch.randint(0, VOCAB, (num_tokens,), generator=generator).to(device)
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def make_step(method: str, loss_type: str, inputs):
    """A closure running forward + backward of `method`; returns the loss as a 0-d tensor (no device sync).

    Methods: `naive` (both logits, float32 log-softmax + `F.kl_div`), `trl_gkd` (TRL's `generalized_jsd_loss` on full
    logits), `trl_chunked` (TRL's chunked divergence), `hf_dense` (`distillation_loss` on full logits) and
    `hf_interop` (`chunked_distillation_loss`, never full logits). `bench_gpu.py` uses the same steps."""
    import torch
    import torch.nn.functional as F

    student_hidden, student_head, teacher_hidden, teacher_head, labels = inputs
    beta = BETA[loss_type]
    num_tokens = student_hidden.shape[0]

    def full_logits():
        student_logits = student_head(student_hidden)
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        return student_logits, teacher_logits

    if method == "naive":

        def step():
            student_logits, teacher_logits = full_logits()
            student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
            teacher_log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
            if loss_type == "forward_kl":
                loss = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True) / num_tokens
            else:
                log_mixture = torch.logaddexp(student_log_probs, teacher_log_probs) - math.log(2.0)
                loss = (
                    0.5 * F.kl_div(log_mixture, teacher_log_probs, reduction="sum", log_target=True)
                    + 0.5 * F.kl_div(log_mixture, student_log_probs, reduction="sum", log_target=True)
                ) / num_tokens
            loss.backward()
            return loss.detach()

    elif method == "trl_gkd":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def step():
            student_logits, teacher_logits = full_logits()
            loss = GKDTrainer.generalized_jsd_loss(
                student_logits.unsqueeze(0), teacher_logits.unsqueeze(0), labels.unsqueeze(0), beta=beta
            )
            loss.backward()
            return loss.detach()

    elif method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, num_tokens, device=student_hidden.device)

        def step():
            loss, _, _ = _chunked_divergence_loss(
                student_hidden.unsqueeze(0), teacher_hidden.unsqueeze(0), student_head.weight, teacher_head.weight,
                mask, beta,
            )  # fmt: skip
            loss.backward()
            return loss.detach()

    elif method == "hf_dense":
        from hf_interop.losses import distillation_loss

        def step():
            student_logits, teacher_logits = full_logits()
            out = distillation_loss(
                student_logits, teacher_logits, labels, loss_type=loss_type, jsd_beta=0.5, compute_ce_loss=False
            )
            out.loss.backward()
            return out.loss.detach()

    elif method in ("hf_interop", "hf_compiled", "hf_liger"):
        from hf_interop.losses import chunked_distillation_loss

        backend = {"hf_interop": "eager", "hf_compiled": "compiled", "hf_liger": "liger"}[method]
        chunk_size = SETTINGS["compiled_chunk_size"] if method == "hf_compiled" else 1024

        def step():
            out = chunked_distillation_loss(
                student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                loss_type=loss_type, jsd_beta=beta if loss_type == "jsd" else 0.5, chunk_size=chunk_size,
                compute_ce_loss=False, backend=backend,
            )  # fmt: skip
            out.loss.backward()
            return out.loss.detach()

    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    return step


def measure(step, inputs, device) -> tuple[float, float, int, float]:
    """(wall seconds, process CPU seconds, peak bytes above the start, loss value) of one forward+backward."""
    import torch

    student_hidden, student_head = inputs[0], inputs[1]
    student_hidden.grad = None
    student_head.weight.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        start, cpu_start = time.perf_counter(), time.process_time()
        value = float(step())
        torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return seconds, cpu_seconds, torch.cuda.max_memory_allocated() - start_bytes, value
    with PeakRSS() as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        value = float(step())
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, peak.delta, value


def profile_table(method: str, loss_types: list[str], num_tokens: int, device) -> str:
    """Top operators of one more step of `method` per loss type (self CPU time), as markdown."""
    import torch
    from torch.profiler import profile

    inputs = build_inputs(num_tokens, device)
    parts = []
    for loss_type in loss_types:
        step = make_step(method, loss_type, inputs)
        step()  # warm (a compiled method compiles here if its chunk shape is new)
        inputs[0].grad = inputs[1].weight.grad = None
        with profile() as prof:
            step()
        inputs[0].grad = inputs[1].weight.grad = None
        total = sum(event.self_cpu_time_total for event in prof.key_averages())
        rows = [f"Profile of `{method}`, {loss_type}, {num_tokens} tokens (self CPU time, load {os.getloadavg()[0]:.1f}):",
                "", "| operator | calls | self CPU (s) | share |", "|---|---:|---:|---:|"]  # fmt: skip
        for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
            rows.append(
                f"| `{event.key[:70]}` | {event.count} | {event.self_cpu_time_total / 1e6:.2f} | "
                f"{event.self_cpu_time_total / total:.0%} |"
            )
        parts.append("\n".join(rows))
    del inputs
    torch.manual_seed(0)
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--losses", nargs="+", default=["forward_kl", "jsd"], choices=sorted(BETA))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--memory-budget-gb", type=float, default=3.0, help="skip dense methods predicted above this")
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="skip cells that would overrun this")
    parser.add_argument("--result-name", default="losses", help="results/<name>.md; name partial runs differently")
    parser.add_argument("--compiled-chunk-size", type=int, default=512, help="hf_compiled's chunk size")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per cell: the table shows the median time (and the range)"
    )
    parser.add_argument(
        "--profile", nargs="*", default=[], metavar="METHOD", help="profile one more step of these methods at the "
        "largest size (PyTorch profiler, top operators by self CPU time appended to the result)",
    )  # fmt: skip
    args = parser.parse_args()
    SETTINGS["compiled_chunk_size"] = args.compiled_chunk_size

    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # every allocation above 64 KiB gets its own mapping and goes back to the OS when freed, so peak RSS
        # measures what each method holds, not what glibc kept cached from an earlier cell
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "hf_liger" in args.methods and (device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        print("hf_liger skipped: needs CUDA and liger-kernel (pip install 'hf_interop[liger-kernel]')")
        args.methods = [method for method in args.methods if method != "hf_liger"]
    sizes = sorted(args.tokens)
    smallest = sizes[0]
    # smallest size first (it calibrates the extrapolations), then the largest: the 16k chunked cells matter most
    order = [(smallest, method, loss) for loss in args.losses for method in args.methods]
    for num_tokens in sorted(sizes[1:], reverse=True):
        for method in ("hf_compiled", "hf_interop", "hf_liger", "trl_chunked", *DENSE_METHODS):
            if method in args.methods:
                order += [(num_tokens, method, loss) for loss in args.losses]

    # warm up every code path on a small input (lazy imports, first-call allocations)
    warm_inputs = build_inputs(64, device)
    # the compiled kernel compiles for its padded chunk shape: warm it up on one full chunk
    compiled_warm_inputs = build_inputs(args.compiled_chunk_size, device) if "hf_compiled" in args.methods else None
    for method in args.methods:
        for loss in args.losses:
            make_step(method, loss, compiled_warm_inputs if method == "hf_compiled" else warm_inputs)()
    del warm_inputs, compiled_warm_inputs

    results: dict[tuple[int, str, str], dict] = {}
    began = time.perf_counter()
    inputs_by_size: dict[int, tuple] = {}
    for num_tokens, method, loss in order:
        key = (num_tokens, method, loss)
        base = results.get((smallest, method, loss))
        scale = num_tokens / smallest
        predicted_bytes = base["peak_bytes"] * scale if base and base.get("peak_bytes") is not None else None
        predicted_seconds = base["seconds"] * scale if base and base.get("seconds") is not None else None
        if method in DENSE_METHODS and predicted_bytes and predicted_bytes > args.memory_budget_gb * 2**30:
            results[key] = {"status": f"not run: needs ~{predicted_bytes / 2**30:.1f} GB > {args.memory_budget_gb} GB"}
            results[key]["extrapolated_peak_bytes"] = predicted_bytes
            results[key]["extrapolated_seconds"] = predicted_seconds
            if base and base.get("cpu_seconds") is not None:
                results[key]["extrapolated_cpu_seconds"] = base["cpu_seconds"] * scale
            continue
        elapsed = time.perf_counter() - began
        if predicted_seconds and elapsed + predicted_seconds > args.time_budget_s:
            results[key] = {"status": f"not run: ~{predicted_seconds:.0f} s would overrun the time budget"}
            continue
        if num_tokens not in inputs_by_size:
            inputs_by_size.clear()
            gc.collect()
            inputs_by_size[num_tokens] = build_inputs(num_tokens, device)
        inputs = inputs_by_size[num_tokens]
        runs = [measure(make_step(method, loss, inputs), inputs, device) for _ in range(args.repeats)]
        seconds, cpu_seconds = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        peak_bytes, value = max(r[2] for r in runs), runs[0][3]
        load = os.getloadavg()[0]
        results[key] = {
            "status": "ok",
            "seconds": seconds,
            "seconds_range": (min(r[0] for r in runs), max(r[0] for r in runs)),
            "cpu_seconds": cpu_seconds,
            "peak_bytes": peak_bytes,
            "loss": value,
            "load": load,
        }
        print(
            f"{num_tokens:>6} {loss:<10} {method:<12} {seconds:8.2f} s {cpu_seconds:8.2f} CPU s "
            f"{peak_bytes / 2**20:9.0f} MiB  loss {value:.6f}  load {load:.1f}  runs "
            f"{' '.join(f'{r[0]:.2f}' for r in runs)}",
            flush=True,
        )

    # the naive reference for the ratios: measured, else extrapolated linearly from the smallest size (marked ~)
    rows = [
        "| tokens | loss | method | peak memory (MiB) | time (s) | CPU time (s) | memory vs naive | time vs naive | "
        "CPU time vs naive | loss value | load (1 min) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for num_tokens in sizes:
        for loss in args.losses:
            naive = results.get((num_tokens, "naive", loss), {})
            naive_bytes = naive.get("peak_bytes") or naive.get("extrapolated_peak_bytes")
            naive_seconds = naive.get("seconds") or naive.get("extrapolated_seconds")
            naive_cpu_seconds = naive.get("cpu_seconds") or naive.get("extrapolated_cpu_seconds")
            naive_mark = "" if naive.get("status") == "ok" else "~"
            for method in args.methods:
                cell = results.get((num_tokens, method, loss), {"status": "not run"})
                if cell["status"] != "ok":
                    memory = (
                        f"~{cell['extrapolated_peak_bytes'] / 2**20:.0f} (extrapolated)"
                        if cell.get("extrapolated_peak_bytes")
                        else "-"
                    )
                    rows.append(
                        f"| {num_tokens} | {loss} | {method} | {memory} | - | - | - | - | - | {cell['status']} | - |"
                    )
                    continue
                memory_ratio = f"{naive_mark}{cell['peak_bytes'] / naive_bytes:.2f}" if naive_bytes else "-"
                time_ratio = f"{naive_mark}{cell['seconds'] / naive_seconds:.2f}" if naive_seconds else "-"
                cpu_ratio = f"{naive_mark}{cell['cpu_seconds'] / naive_cpu_seconds:.2f}" if naive_cpu_seconds else "-"
                low, high = cell["seconds_range"]
                spread = f" ({low:.2f}-{high:.2f})" if args.repeats > 1 else ""
                rows.append(
                    f"| {num_tokens} | {loss} | {method} | {cell['peak_bytes'] / 2**20:.0f} | {cell['seconds']:.2f}{spread} | "
                    f"{cell['cpu_seconds']:.2f} | {memory_ratio} | {time_ratio} | {cpu_ratio} | {cell['loss']:.6f} | "
                    f"{cell['load']:.1f} |"
                )
    note = (
        f"Forward+backward of the KD loss from hidden states (hidden {HIDDEN}, vocab {VOCAB}); student hidden states "
        "and head get gradients, the teacher none. Peak memory: "
        + ("CUDA max allocated above the start." if device.type == "cuda" else "peak RSS above the start (CPU).")
        + (
            f" Time: median of {args.repeats} timed runs per cell (their range in brackets; CPU time and ratios use "
            "medians), after a small warm-up."
            if args.repeats > 1
            else " One timed run per cell after a small warm-up."
        )
        + " `~` = ratio against the naive cost extrapolated linearly "
        "from the smallest size (the naive case was not run there). Timings taken on a machine shared with other "
        "jobs: compare ratios within one run, not absolute seconds; the process CPU time (all threads) is less "
        "sensitive to the other jobs than the wall time."
    )
    markdown = note + "\n\n" + "\n".join(rows)
    for method in args.profile:
        markdown += "\n\n" + profile_table(method, args.losses, sizes[-1], device)
    data = {
        "device": str(device),
        "hidden": HIDDEN,
        "vocab": VOCAB,
        "results": [
            {"tokens": key[0], "method": key[1], "loss_type": key[2], **value} for key, value in results.items()
        ],
    }
    write_result(args.result_name, markdown, data)


if __name__ == "__main__":
    main()
