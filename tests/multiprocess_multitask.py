"""Launched by `tests/multitask/test_multitask_multiprocess.py` (`torchrun --nproc_per_node 2 ...`), and called in
process by it for the one-process reference.

Trains a `MultiTaskModel` (tiny Llama backbone saved in MODEL_DIR, a classification head) on the task datasets saved
under DATA_DIR (one `save_to_disk` folder per task), and from rank 0 writes `OUTPUT/final.safetensors` (every weight
and the learned log-variances) and `OUTPUT/log_history.json`.

Usage: multiprocess_multitask.py MODEL_DIR DATA_DIR OUTPUT PER_DEVICE_BATCH WEIGHTING SAMPLING
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run(model_dir: str, data_dir: str, output: str, per_device_batch: int, weighting: str, sampling: str) -> dict:
    import torch
    from datasets import load_from_disk
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_interop import MultiTaskConfig, MultiTaskModel, MultiTaskTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = {folder.name: load_from_disk(str(folder)) for folder in sorted(Path(data_dir).iterdir())}
    torch.manual_seed(0)  # the head's initialisation
    model = MultiTaskModel(
        AutoModelForCausalLM.from_pretrained(model_dir), {"topic": {"type": "classification", "num_labels": 2}}
    )
    args = MultiTaskConfig(
        output_dir=output,
        max_steps=4,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-3,
        log_variance_learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
        task_weighting=weighting,
        task_sampling=sampling,
        task_weights={"reference_a": 0.5},
    )
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=tasks, processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        if trainer.log_variances is not None:
            state["log_variances"] = trainer.log_variances.detach().clone()
        Path(output).mkdir(parents=True, exist_ok=True)
        # tied weights share memory; safetensors wants each tensor once
        save_file({name: tensor.clone() for name, tensor in state.items()}, os.path.join(output, "final.safetensors"))
        (Path(output) / "log_history.json").write_text(json.dumps(trainer.state.log_history))
        (Path(output) / "world.json").write_text(json.dumps({"num_processes": trainer.accelerator.num_processes}))
    return {"trainer": trainer}


if __name__ == "__main__":
    model_dir, data_dir, output, batch, weighting, sampling = sys.argv[1:7]
    run(model_dir, data_dir, output, int(batch), weighting, sampling)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
