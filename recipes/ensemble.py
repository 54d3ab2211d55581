"""A logit-level ensemble of causal LMs that share a tokenizer, optionally with fitted weights.

Options come from dataclasses (`ensemble.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop ensemble`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/ensemble.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("ensemble", argv, prog="recipes/ensemble.py")


if __name__ == "__main__":
    main()
