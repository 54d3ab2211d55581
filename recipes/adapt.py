"""LoRA fine-tuning of a causal LM on text; saves the adapter (and, with --export_merged, the merged model).

Options come from dataclasses (`adapt.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop adapt`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/adapt.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("adapt", argv, prog="recipes/adapt.py")


if __name__ == "__main__":
    main()
