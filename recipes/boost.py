"""Boosting: SAMME for classifiers; loss reweighting or additive product-of-experts boosting for causal LMs.

Options come from dataclasses (`boost.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop boost`.

    python recipes/boost.py --config CONFIG.yaml   (rerun the same command to resume after the last finished member)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("boost", argv, prog="recipes/boost.py")


if __name__ == "__main__":
    main()
