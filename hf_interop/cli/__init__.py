"""The `hf-interop` command line and the recipe code it shares with `recipes/*.py` (entry point `hf_interop.cli:main`).

`main.py` holds the argparse front (subcommands demo / compare / card, one-line errors, SIGTERM handling),
`arguments.py` the recipe options (dataclasses and the `--config file.yaml` merge), `recipes.py` what each recipe
runs. Every name below stays importable from `hf_interop.cli`.
"""

# Defined in hf_interop.utils (the recipes and the demo share it); importable from here as before.
from ..utils import staged_output_dir
from .arguments import (
    AdaptScriptArguments,
    CacheTeacherScriptArguments,
    DataArguments,
    DistillScriptArguments,
    EnsembleScriptArguments,
    MergeScriptArguments,
    _recipe_parser,
    check_model_argument,
    parse_recipe_args,
)
from .main import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, build_parser, main
from .recipes import (
    RECIPES,
    leave_process_group,
    report_recipe_result,
    run_adapt,
    run_cache_teacher,
    run_distill,
    run_ensemble,
    run_merge,
    run_recipe,
    run_recipe_main,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_OK",
    "RECIPES",
    "AdaptScriptArguments",
    "CacheTeacherScriptArguments",
    "DataArguments",
    "DistillScriptArguments",
    "EnsembleScriptArguments",
    "MergeScriptArguments",
    "_recipe_parser",
    "build_parser",
    "check_model_argument",
    "leave_process_group",
    "main",
    "parse_recipe_args",
    "report_recipe_result",
    "run_adapt",
    "run_cache_teacher",
    "run_distill",
    "run_ensemble",
    "run_merge",
    "run_recipe",
    "run_recipe_main",
    "staged_output_dir",
]
