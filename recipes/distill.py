"""Knowledge distillation: a teacher (or a teacher-logits cache) into a student, with DistillationTrainer.

Options come from dataclasses (`distill.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop distill`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/distill.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("distill", argv, prog="recipes/distill.py")


if __name__ == "__main__":
    main()
