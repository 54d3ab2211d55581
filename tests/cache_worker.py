"""Run `cache_teacher_logits` in its own process(es), for tests/distill/test_teacher_cache.py.

    python cache_worker.py MODEL_DIR DATASET_DIR OUTPUT_DIR [--kill_after_forwards N] [options]
    python -m torch.distributed.run --standalone --nproc_per_node 2 cache_worker.py MODEL_DIR DATASET_DIR OUTPUT_DIR

`--kill_after_forwards N` sends SIGKILL to this process right before the teacher's N-th forward pass: a real
crash, with no exception handler or cleanup running.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch


class _KillingTeacher(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, kill_after_forwards: int | None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.kill_after_forwards = kill_after_forwards
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        if self.kill_after_forwards is not None and self.calls >= self.kill_after_forwards:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("dataset_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--kill_after_forwards", type=int, default=None)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--shard_size", type=int, default=4)
    parser.add_argument("--encoding", default="float16")
    args = parser.parse_args()

    # One thread everywhere, so every process computes bit-identical logits (the tests compare bytes).
    torch.set_num_threads(1)
    from datasets import load_from_disk

    from hf_interop import cache_teacher_logits, load_causal_lm

    model, tokenizer = load_causal_lm(args.model_dir, dtype="float32")
    cache_teacher_logits(
        _KillingTeacher(model, args.kill_after_forwards),
        load_from_disk(args.dataset_dir),
        args.output_dir,
        top_k=args.top_k,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        tokenizer=tokenizer,
        teacher_name_or_path="tiny-llama",
        show_progress=False,
        encoding=args.encoding,
    )


if __name__ == "__main__":
    main()
