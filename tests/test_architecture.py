"""The package's shape: imports run down the layers of ARCHITECTURE.md, no cycles, no oversized modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_interop"

# Layer of every module or folder, lowest first (ARCHITECTURE.md draws the same table). A module may import from
# its own layer or lower ones. The re-export shims at old paths are left out: they import upwards by design.
LAYERS: dict[str, int] = {
    "_compat": 1,
    "utils": 1,
    "logging_utils": 1,
    "loading": 1,
    "data": 1,
    "evaluation": 1,
    "hub": 1,
    "metrics": 1,
    "safetensors_checks": 1,
    "errors": 1,
    "text_alignment": 2,
    "losses": 2,
    "ensemble.combination": 2,
    "merge.methods": 2,
    "merge.streaming": 2,
    "multitask.sampling": 2,
    "multitask.weighting": 2,
    "distill": 3,
    "ensemble": 3,
    "merge": 3,
    "multitask": 3,
    "adapters": 4,
    "callbacks": 4,
    "compare": 4,
    "demo": 5,
    "cli": 5,
}
SHIMS = {
    "cross_tokenizer",
    "cross_tokenizer_ensemble",
    "distillation_config",
    "distillation_trainer",
    "model_card",
    "student_init",
    "teacher_cache",
}
MAX_MODULE_LINES = 800


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if _module_name(path)}


def _imports(name: str, path: Path) -> set[str]:
    """Package-internal modules `name` imports (top-level and function-level alike)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # imports only type checkers read are no dependency at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("hf_interop."):
                target = node.module.removeprefix("hf_interop.")
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import losses` imports a module, not a name
                found.add(f"{target}.{alias.name}" if target else alias.name)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("hf_interop.") for a in node.names if a.name.startswith("hf_interop."))
    modules = _modules()
    return {target for target in found if target in modules and target != name}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    return None


def test_every_module_has_a_layer():
    missing = [name for name in _modules() if name not in SHIMS and _layer(name) is None]
    assert not missing, f"give {missing} a layer in LAYERS (and in ARCHITECTURE.md)"


def test_imports_run_down_the_layers():
    upward = []
    for name, path in _modules().items():
        if name in SHIMS:
            continue
        for target in _imports(name, path):
            if target in SHIMS:
                upward.append(f"{name} imports the old path {target}; import its new home")
            elif _layer(target) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in _modules().items()}
    # Parents import their children to re-export them; a child importing a sibling through the parent package is
    # the same edge, so a package's own __init__ -> child edges are left out of the cycle search.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(f"{name}.")}
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(" -> ".join([*stack[stack.index(node) :], node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it (limit {MAX_MODULE_LINES})"
