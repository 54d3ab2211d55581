"""The top-level API: every advertised name resolves, and `import hf_interop` stays light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import hf_interop


@pytest.mark.parametrize("name", sorted(hf_interop.__all__))
def test_every_public_name_resolves(name):
    value = getattr(hf_interop, name)
    assert value is not None
    if name in hf_interop._LAZY_IMPORTS:
        # The lazy map points at the module that really defines the name (not a re-export that could drift).
        module = importlib.import_module(f"hf_interop.{hf_interop._LAZY_IMPORTS[name]}")
        assert getattr(module, name) is value


def test_every_submodule_is_reachable_as_an_attribute():
    names = {info.name for info in pkgutil.iter_modules(hf_interop.__path__) if not info.name.startswith("_")}
    missing = sorted(names - hf_interop._SUBMODULES)
    assert not missing, f"add {missing} to hf_interop._SUBMODULES"
    for name in names:
        assert getattr(hf_interop, name).__name__ == f"hf_interop.{name}"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'DistilationTrainer'"):
        hf_interop.DistilationTrainer  # noqa: B018


def test_import_does_not_load_torch_or_transformers():
    code = (
        "import sys, hf_interop; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
