"""Hot-path audit of one `DistillationTrainer` step with the PyTorch profiler (CPU; CUDA when present).

Tiny random Llama student and teacher (hidden 64, 2 layers) with a real-size vocabulary (49,152, SmolLM2's), batch
4 x 128 tokens, chunked forward KL. For each loss backend (eager, compiled) and two chunk sizes (128 and 64 tokens:
4 and 8 chunks), one step after a warm-up step is profiled, and the script reports:

- host syncs: `aten::_local_scalar_dense` (what `.item()`, `int()`, `float()`, `bool()` of a tensor run) and
  `aten::nonzero` (a sync on CUDA: its output size depends on the data) per step; the difference between the 8-chunk
  and the 4-chunk step divided by 4 is the number per chunk. On CUDA `torch.cuda.set_sync_debug_mode` would flag
  them too; on CPU there is no device to wait for, so these events are what a GPU would wait on;
- copies of hidden-state-sized tensors (`aten::copy_`, `aten::clone`, `aten::cat`, `aten::index_select` whose input
  is `(tokens, hidden)` of either model): duplicated hidden states would show here;
- the teacher's forward: its share of the step, and whether it ran without autograd (no `*Backward` nodes are
  recorded for it: it runs under `torch.no_grad()`) and under the trainer's autocast;
- the top operators by self CPU time.

    python benchmarks/profile_trainer_step.py        # about 1-2 minutes on 2 idle cores; writes results/trainer_profile.md
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VOCAB, HIDDEN, BATCH, BLOCK = 49152, 64, 4, 128
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
COPY_OPS = ("aten::copy_", "aten::clone", "aten::cat", "aten::index_select", "aten::contiguous")


class _SyncRecorder:
    """Counts the Python-level calls that wait for a tensor's value, by the innermost project (else library) frame."""

    METHODS = ("item", "__bool__", "__int__", "__float__", "tolist")

    def __enter__(self):
        import torch

        self.sources: dict[str, int] = {}
        self.originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        import traceback

        def wrapped(tensor, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if "hf_interop/" in f.filename and "benchmarks/" not in f.filename]
            ours = ours or [f for f in frames if "transformers/" in f.filename or "accelerate/" in f.filename]
            if ours:
                frame = ours[-1]
                where = f"{frame.filename.split('hf_interop/')[-1].split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
                key = f"{name} @ {where}"
                self.sources[key] = self.sources.get(key, 0) + 1
            return original(tensor, *args, **kwargs)

        return wrapped

    def __exit__(self, *exc):
        import torch

        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def profiled_step(backend: str, chunk_size: int, work_dir: Path):
    import torch
    from datasets import Dataset
    from helpers import build_tiny_causal_lm, make_distillation_args
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from hf_interop import DistillationTrainer
    from hf_interop.distill.collators import _PaddingCollator

    student = build_tiny_causal_lm("llama", VOCAB, seed=0)
    teacher = build_tiny_causal_lm("llama", VOCAB, seed=1, num_hidden_layers=3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH * 2, BLOCK), generator=generator)
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    state: dict = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, args, control_state, control, **kwargs):
            if control_state.global_step == 1:  # the second step: compiled kernels and caches are warm
                state["profiler"] = profile(activities=activities, record_shapes=True)
                state["syncs"] = _SyncRecorder().__enter__()
                state["profiler"].__enter__()
                state["start"] = time.perf_counter()

        def on_step_end(self, args, control_state, control, **kwargs):
            if "profiler" in state and "seconds" not in state:
                state["seconds"] = time.perf_counter() - state["start"]
                state["profiler"].__exit__(None, None, None)
                state["syncs"].__exit__(None, None, None)

    args = make_distillation_args(
        work_dir / f"{backend}_{chunk_size}", max_steps=2, loss_type="forward_kl", kd_ratio=1.0,
        loss_chunk_size=chunk_size, loss_backend=backend, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, data_collator=_PaddingCollator(0),
        callbacks=[Profile()],
    )  # fmt: skip
    trainer.train()
    return state["profiler"], state["seconds"], state["syncs"].sources


def analyse(prof) -> dict:
    events = prof.events()
    counts = {name: sum(1 for event in events if event.name == name) for name in SYNC_OPS}
    hidden_copies = []
    for event in events:
        if event.name in COPY_OPS and event.input_shapes:
            shape = event.input_shapes[0]
            if len(shape) >= 2 and shape[-1] == HIDDEN and shape[0] * (shape[1] if len(shape) == 3 else 1) >= BLOCK:
                hidden_copies.append(f"{event.name}{tuple(shape)}")
    totals = {}
    for event in prof.key_averages():
        totals[event.key] = event.self_cpu_time_total
    step_us = sum(totals.values())
    return {"syncs": counts, "hidden_copies": hidden_copies, "totals": totals, "step_us": step_us}


def main() -> None:
    import torch

    torch.manual_seed(0)
    work_dir = Path(tempfile.mkdtemp(prefix="profile_trainer_"))
    runs = {}
    for backend in ("eager", "compiled"):
        for chunk_size in (128, 64):
            prof, seconds, sources = profiled_step(backend, chunk_size, work_dir)
            runs[(backend, chunk_size)] = {**analyse(prof), "seconds": seconds, "load": os.getloadavg()[0]}
            runs[(backend, chunk_size)]["sync_sources"] = sources
            if chunk_size == 128:
                runs[(backend, chunk_size)]["table"] = prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=12
                )
            print(backend, chunk_size, runs[(backend, chunk_size)]["syncs"], f"{seconds:.2f} s", flush=True)

    lines = [
        f"One profiled `DistillationTrainer` step (the second; tiny Llama student and 3-layer teacher, hidden {HIDDEN}, "
        f"vocab {VOCAB:,}, batch {BATCH} x {BLOCK}, chunked forward KL, {torch.get_num_threads()} threads). Syncs: "
        "`aten::_local_scalar_dense` (`.item()`/`int()`/`float()`/`bool()` of a tensor) and `aten::nonzero` (a "
        "data-dependent size) per step; per chunk = (8-chunk step - 4-chunk step) / 4. Hidden-state copies: copy ops "
        "whose input is a `(tokens, hidden)` tensor.\n",
        "| backend | chunk | chunks | step (s) | load | `_local_scalar_dense` | `nonzero` | syncs per chunk | "
        "hidden-state copies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (backend, chunk_size), run in runs.items():
        other = runs[(backend, 64 if chunk_size == 128 else 128)]
        small, large = (run, other) if chunk_size == 128 else (other, run)
        per_chunk = (sum(large["syncs"].values()) - sum(small["syncs"].values())) / 4
        lines.append(
            f"| {backend} | {chunk_size} | {-(-(BATCH * (BLOCK - 1)) // chunk_size)} | {run['seconds']:.2f} | "
            f"{run['load']:.1f} | {run['syncs']['aten::_local_scalar_dense']} | {run['syncs']['aten::nonzero']} | "
            f"{per_chunk:g} | {', '.join(run['hidden_copies']) or 'none'} |"
        )
    for backend in ("eager", "compiled"):
        lines += [
            "",
            f"Python-level host syncs of one step, {backend}, chunk 128 (`Tensor.item`/`__bool__`/`__int__`/`__float__`/`tolist` patched; the innermost hf_interop frame, else transformers/accelerate):",
            "",
        ]
        lines += [f"- {count} x {where}" for where, count in sorted(runs[(backend, 128)]["sync_sources"].items())]
    for backend in ("eager", "compiled"):
        lines += [
            "",
            f"Top operators, {backend}, chunk 128 (self CPU time):",
            "",
            "```",
            runs[(backend, 128)]["table"],
            "```",
        ]
    write_result("trainer_profile", "\n".join(lines), {
        f"{backend}_{chunk}": {key: value for key, value in run.items() if key not in ("table", "totals")}
        for (backend, chunk), run in runs.items()
    })  # fmt: skip


if __name__ == "__main__":
    main()
