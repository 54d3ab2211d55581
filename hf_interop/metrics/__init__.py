"""`evaluate` modules of hf_interop's own, shipped in the package and loaded by path (no network).

```python
import hf_interop.metrics

perplexity = hf_interop.metrics.load("perplexity")
perplexity.compute(predictions=["some text"], model=model, tokenizer=tokenizer)
```

Each module lives in its own folder (`hf_interop/metrics/<name>/<name>.py`), the layout `evaluate.load(<folder>)`
expects, so `evaluate.load(hf_interop.metrics.module_path("accuracy"))` works as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRIC_NAMES = ("perplexity", "accuracy", "exact_match", "top1_agreement", "kl_divergence")


def module_path(name: str) -> str:
    """Absolute path of the folder holding the `evaluate` module `name` (what `evaluate.load` takes)."""
    if name not in METRIC_NAMES:
        raise ValueError(
            f"metric {name!r} is not one of hf_interop's; use one of {', '.join(METRIC_NAMES)} (for other metrics "
            "call `evaluate.load` directly)."
        )
    folder = Path(__file__).resolve().parent / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric module {folder / f'{name}.py'} is missing from the installation; reinstall.")
    return str(folder)


def load(name: str, **kwargs: Any):
    """Load hf_interop's `evaluate` module `name` by path (offline); `kwargs` go to `evaluate.load`."""
    import evaluate

    return evaluate.load(module_path(name), **kwargs)


def list_metrics() -> list[str]:
    """Names `load` accepts."""
    return list(METRIC_NAMES)
