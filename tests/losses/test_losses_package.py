"""The face of `hf_interop.losses`: every name it exported as one module still resolves, from the file that defines
it; the names configs import stay torch-free; the loss files import nothing from the layers above them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hf_interop
from hf_interop import losses
from hf_interop.distillation_config import DISTILLATION_LOSS_TYPES, HIDDEN_LOSS_TYPES

# what code, tests, benchmarks and recipes used as `hf_interop.losses.<name>` when losses was one module
NAMES_USED_BEFORE_THE_SPLIT = [
    "LOSS_TYPES",
    "SPARSE_LOSS_TYPES",
    "DistillationLossOutput",
    "OutputHead",
    "chunked_distillation_loss",
    "chunked_sparse_distillation_loss",
    "distillation_loss",
    "output_logits_fn",
    "sparse_distillation_loss",
    "token_divergence",
    "_ALL_IGNORED_WARNING",
    "_row_dot",
]
# the layers above the losses: trainers, configs, models, outputs and commands
HIGHER_MODULES = {
    "adapters", "callbacks", "cli", "compare", "demo", "distill", "distillation_config", "distillation_trainer",
    "ensemble", "hub", "merge", "model_card", "student_init", "teacher_cache",
}  # fmt: skip


@pytest.mark.parametrize("name", NAMES_USED_BEFORE_THE_SPLIT)
def test_every_name_of_the_old_module_still_resolves(name):
    assert getattr(losses, name) is not None
    assert name in dir(losses)


@pytest.mark.parametrize("name", sorted(losses._LAZY_IMPORTS))
def test_the_lazy_map_names_the_file_that_defines_each_name(name):
    module = importlib.import_module(f"hf_interop.losses.{losses._LAZY_IMPORTS[name]}")
    value = getattr(losses, name)
    assert getattr(module, name) is value
    if callable(value):
        assert value.__module__ == module.__name__


def test_public_names_are_listed_in_all_and_unknown_names_raise():
    assert set(losses.__all__) == {name for name in NAMES_USED_BEFORE_THE_SPLIT if not name.startswith("_")} | {
        "HIDDEN_LOSS_TYPES"
    }
    with pytest.raises(AttributeError, match="has no attribute 'distilation_loss'"):
        losses.distilation_loss  # noqa: B018


def test_config_loss_names_match_the_names_file():
    from hf_interop.losses import names

    assert tuple(DISTILLATION_LOSS_TYPES) == names.LOSS_TYPES
    assert tuple(HIDDEN_LOSS_TYPES) == names.HIDDEN_LOSS_TYPES
    assert set(names.SPARSE_LOSS_TYPES) <= set(names.LOSS_TYPES)


def test_importing_the_package_and_its_names_does_not_load_torch():
    code = (
        "import sys; import hf_interop.losses; from hf_interop.losses.names import LOSS_TYPES; "
        "from hf_interop.losses import SPARSE_LOSS_TYPES; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_loss_files_import_nothing_from_the_layers_above():
    folder = Path(losses.__file__).parent
    upward = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level >= 2:  # `from ..x import` leaves the package
                    target = (node.module or "").split(".")[0]
                elif node.level == 0 and (node.module or "").startswith("hf_interop."):
                    target = node.module.split(".")[1]
                else:
                    continue
                if target in HIGHER_MODULES or (target == "" and any(a.name in HIGHER_MODULES for a in node.names)):
                    upward.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "hf_interop" and len(parts) > 1 and parts[1] in HIGHER_MODULES:
                        upward.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not upward, upward
    assert hf_interop.losses is losses
