"""Peak memory of merging 3 SmolLM2-135M-size checkpoints, streamed, against one model's size.

Three perturbed copies of the real teacher checkpoint (`hf_interop.default_teacher_path()`, float32) are written
to a temporary folder; each measurement then runs in a fresh subprocess (so no allocator state carries over) and
reports the peak resident memory above the process's state after imports:

- loading one model (`load_causal_lm`), the reference "one model's size";
- `merge_checkpoints(..., "linear")` and `"ties"` (3 checkpoints + base), streamed;
- a naive in-memory average of 3 state dicts, for contrast.

Run: `python benchmarks/bench_merge.py` (about 2-3 minutes on 2 CPU cores). Target: streamed merges peak at
<= 1.5x one model's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PeakRSS, write_result

MiB = 2**20


def _make_copies(teacher_dir: Path, root: Path, count: int = 3) -> list[Path]:
    import torch

    from hf_interop import load_causal_lm

    model, tokenizer = load_causal_lm(teacher_dir, dtype="float32")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    copies = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(original[name] + 1e-3 * torch.randn(parameter.shape, generator=generator))
        folder = root / f"copy{index}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        copies.append(folder)
    return copies


def _child(task: str, args: list[str]) -> None:
    """Runs in a fresh process: measure one task, print JSON."""
    import torch  # imported before the baseline so the measurement is the task's own memory
    import transformers  # noqa: F401

    from hf_interop import load_causal_lm, merge_checkpoints

    start = time.perf_counter()
    with PeakRSS() as peak:
        if task == "load":
            # from_pretrained memory-maps the weights lazily; one forward pass touches them all
            model, _ = load_causal_lm(args[0], load_tokenizer_too=False)
            with torch.no_grad():
                model(input_ids=torch.ones(1, 8, dtype=torch.long))
        elif task in ("linear", "ties"):
            *checkpoints, base, output = args
            merge_checkpoints(
                checkpoints,
                task,
                base=base if task == "ties" else None,
                density=0.5 if task == "ties" else None,
                output_dir=output,
                show_progress=False,
            )
        elif task == "naive":
            from safetensors.torch import load_file

            states = [load_file(str(Path(folder) / "model.safetensors")) for folder in args]
            merged = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
            del merged
    print(json.dumps({"task": task, "peak_bytes": peak.delta, "seconds": time.perf_counter() - start}))


def _run_child(task: str, args: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", task, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    from hf_interop import default_teacher_path

    teacher_dir = default_teacher_path()
    model_bytes = (teacher_dir / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        copies = _make_copies(teacher_dir, root)
        load = _run_child("load", [copies[0]])
        linear = _run_child("linear", [*copies, teacher_dir, root / "merged_linear"])
        ties = _run_child("ties", [*copies, teacher_dir, root / "merged_ties"])
        naive = _run_child("naive", copies)

    rows = [
        ("load one model + one forward pass", load),
        ("merge 3, linear, streamed", linear),
        ("merge 3 + base, ties, streamed", ties),
        ("merge 3, linear, naive in-memory", naive),
    ]
    lines = [
        f"Checkpoint: SmolLM2-135M-Instruct float32, model.safetensors = {model_bytes / MiB:.0f} MiB; 3 perturbed "
        "copies. Peak RSS above the process's state after imports, each task in a fresh process. Shared machine "
        "(other jobs ran at the same time; timings are indicative).",
        "",
        "| task | peak RSS (MiB) | x model file size | seconds |",
        "|---|---:|---:|---:|",
    ]
    for label, result in rows:
        lines.append(
            f"| {label} | {result['peak_bytes'] / MiB:.0f} | {result['peak_bytes'] / model_bytes:.2f} | "
            f"{result['seconds']:.1f} |"
        )
    target_met = max(linear["peak_bytes"], ties["peak_bytes"]) <= 1.5 * model_bytes
    lines += ["", f"Target (streamed merges <= 1.5x one model's size): {'met' if target_met else 'NOT met'}."]
    write_result(
        "merge",
        "\n".join(lines),
        {
            "model_bytes": model_bytes,
            "results": {label: result for label, result in rows},
            "target_met": target_met,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    else:
        main()
