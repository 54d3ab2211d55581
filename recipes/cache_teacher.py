"""Run a teacher once over the packed training set and store its top-k log-probabilities.

Options come from dataclasses (`cache_teacher.py --help` lists them all) and from `--config file.yaml`; flags on the command
line override the file. The same code runs as `hf-interop cache-teacher`.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/cache_teacher.py --config CONFIG.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_interop.cli import run_recipe_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_recipe_main("cache-teacher", argv, prog="recipes/cache_teacher.py")


if __name__ == "__main__":
    main()
