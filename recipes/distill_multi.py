"""Multi-teacher distillation: several teachers into one student, with MultiTeacherDistillationTrainer.

Each example is routed to its teacher (`teacher_combination: route`, the teachers' own training texts given as
`teacher_datasets`) or taught by a mixture of all of them. Options come from dataclasses (`distill_multi.py --help`
lists them all) and from `--config file.yaml`; flags on the command line override the file. The same code runs as
`hf-interop distill-multi`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/distill_multi.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("distill-multi", argv, prog="recipes/distill_multi.py")


if __name__ == "__main__":
    main()
