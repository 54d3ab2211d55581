"""A weight-space merge of checkpoints of one architecture (linear, task arithmetic, TIES, DARE, SLERP).

Options come from dataclasses (`merge.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop merge`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/merge.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("merge", argv, prog="recipes/merge.py")


if __name__ == "__main__":
    main()
