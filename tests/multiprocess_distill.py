"""Launched by `tests/distill/test_multiprocess.py` (e.g. `torchrun --nproc_per_node 2 tests/multiprocess_distill.py ...`).

Runs the distill recipe (the same code as `recipes/distill.py` and `hf-interop distill`) and, per rank, writes
`REPORT_DIR/rank<R>.json` (what the trainer looked like: world size, engine, how the student and teacher were wrapped
or sharded, a digest of the teacher's weights, who saved) and `REPORT_DIR/rank<R>.log` (everything the rank printed),
so the test can check DDP and FSDP behaviour from outside.

Usage: multiprocess_distill.py REPORT_DIR [distill options...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def weights_digest(module) -> str:
    """SHA-256 of a module's parameters and buffers (name, dtype, shape, bytes), in state-dict order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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

    import hf_interop.hub.cards

    recording(transformers.PreTrainedModel, "save_pretrained")
    recording(transformers.PreTrainedTokenizerBase, "save_pretrained")
    recording(hf_interop.hub.cards, "write_model_card")
    result = run_recipe("distill", recipe_argv, prog="multiprocess_distill.py")
    report_recipe_result("distill", result)
    trainer = result["trainer"]
    teacher = trainer.teacher_model
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    report = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
        "use_chunked_loss": trainer.use_chunked_loss,
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "student_is_fsdp_module": isinstance(trainer.model, FSDPModule),
        "student_sharded": any(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "teacher_class": type(teacher).__name__,
        "teacher_is_ddp": isinstance(teacher, torch.nn.parallel.DistributedDataParallel),
        "teacher_is_fsdp_module": any(isinstance(m, FSDPModule) for m in teacher.modules()),
        "teacher_sharded": any(isinstance(p, DTensor) for p in teacher.parameters()),
        "teacher_digest": weights_digest(teacher),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_training": teacher.training,
        "writes": [write for write in writes if write["is_main_process"]],
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
    }
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    from hf_interop.cli import leave_process_group

    leave_process_group()


if __name__ == "__main__":
    main()
