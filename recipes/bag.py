"""Bagging: members (LoRA adapters of one base by default) trained on bootstrap resamples, with out-of-bag scores.

Options come from dataclasses (`bag.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop bag`.

    python recipes/bag.py --config CONFIG.yaml   (rerun the same command to resume after the last finished member)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("bag", argv, prog="recipes/bag.py")


if __name__ == "__main__":
    main()
