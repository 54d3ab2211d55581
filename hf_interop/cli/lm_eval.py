"""`hf-interop lm-eval ARGS...`: lm-evaluation-harness's own CLI, with saved hf_interop ensembles loadable.

`lm_eval --model hf --model_args pretrained=ens` cannot open a saved ensemble: transformers' Auto classes learn the
`hf_interop_ensemble` model type only when `hf_interop.ensemble` is imported. This command imports it (registering
`AutoConfig` / `AutoModelForCausalLM` for ensembles) and hands every argument, unchanged, to lm-eval's CLI:

```bash
pip install 'hf_interop[lm_eval]'
hf-interop lm-eval --model hf --model_args pretrained=./ens --tasks hellaswag --device cpu
```
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

LM_EVAL_INSTALL_HINT = "pip install 'hf_interop[lm_eval]'"


def run_lm_eval(arguments: Sequence[str]) -> int:
    """Register the ensemble Auto classes, then run lm-eval's CLI with `arguments`; returns its exit code."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise ImportError(
            f"hf-interop lm-eval needs lm-evaluation-harness, which is not installed ({error}); run "
            f"{LM_EVAL_INSTALL_HINT}."
        ) from error
    import hf_interop.ensemble  # noqa: F401 - registers the ensemble config and model with the Auto classes

    saved_argv = sys.argv
    sys.argv = ["lm_eval", *arguments]
    try:
        cli_evaluate()
    except SystemExit as exit_request:  # lm-eval's --help, argparse errors and its own exits
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0
