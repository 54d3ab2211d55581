"""Launched by `tests/test_multiprocess.py` (e.g. `torchrun --nproc_per_node 2 tests/multiprocess_distill.py ...`).

Runs the distill recipe (the same code as `recipes/distill.py` and `hf-interop distill`) and, per rank, writes
`REPORT_DIR/rank<R>.json` (what the trainer looked like: world size, how the student and teacher were wrapped, who
saved) and `REPORT_DIR/rank<R>.log` (everything the rank printed), so the test can check DDP behaviour from outside.

Usage: multiprocess_distill.py REPORT_DIR [distill options...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    report_dir = Path(sys.argv[1])
    recipe_argv = sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    report_dir.mkdir(parents=True, exist_ok=True)
    # Everything this rank prints (Python and C level) goes to its own file.
    log = open(report_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - kept open for the whole process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

    import torch

    from hf_interop.cli import report_recipe_result, run_recipe

    # Record every call that writes files into the output folder, with whether it was allowed to write.
    writes: list[dict] = []

    def recording(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            writes.append(
                {
                    "call": f"{getattr(owner, '__name__', owner)}.{name}",
                    "is_main_process": kwargs.get("is_main_process", True),
                }
            )
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    import transformers

    import hf_interop.model_card

    recording(transformers.PreTrainedModel, "save_pretrained")
    recording(transformers.PreTrainedTokenizerBase, "save_pretrained")
    recording(hf_interop.model_card, "write_model_card")
    result = run_recipe("distill", recipe_argv, prog="multiprocess_distill.py")
    report_recipe_result("distill", result)
    trainer = result["trainer"]
    teacher = trainer.teacher_model
    report = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "teacher_class": type(teacher).__name__,
        "teacher_is_ddp": isinstance(teacher, torch.nn.parallel.DistributedDataParallel),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_training": teacher.training,
        "writes": [write for write in writes if write["is_main_process"]],
        "global_step": trainer.state.global_step,
    }
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
