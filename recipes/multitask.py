"""Multi-task training: several text domains (causal LM) plus a domain classifier on one shared backbone, with
weighted task losses; saves the MultiTaskModel and a card listing the tasks, their weights and held-out results.

Options come from dataclasses (`multitask.py --help` lists them all) and from `--config file.yaml`; flags on the
command line override the file. The same code runs as `hf-interop multitask`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/multitask.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("multitask", argv, prog="recipes/multitask.py")


if __name__ == "__main__":
    main()
