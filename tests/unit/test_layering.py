"""The dependency direction ARCHITECTURE.md draws, checked on every module's imports:
rtml (kernel) <- lakehouse, models, security, observability, cluster <- streaming, agents <-
deployments, api <- the CLI (rtml/cli.py, benchmarks). A package may import its own layer and the
layers below it, never one above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER = {
    "rtml": 0,
    "lakehouse": 1,
    "models": 1,
    "security": 1,
    "observability": 1,
    "cluster": 1,
    "streaming": 2,
    "agents": 2,
    "deployments": 3,
    "api": 3,
    "benchmarks": 4,
}
ENTRY_POINTS = {Path("rtml/cli.py"), Path("rtml/__main__.py")}  # the CLI: above everything


def _modules() -> list[Path]:
    return sorted(
        path.relative_to(ROOT)
        for package in LAYER
        if (ROOT / package).is_dir()
        for path in (ROOT / package).rglob("*.py")
        if ".venv" not in path.parts
    )


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & LAYER.keys()


@pytest.mark.parametrize("path", [p for p in _modules() if p not in ENTRY_POINTS], ids=str)
def test_no_module_imports_a_layer_above_its_own(path):
    own = LAYER[path.parts[0]]
    above = sorted(name for name in _imported_packages(path) if LAYER[name] > own)
    assert not above, f"{path} imports {above}, above its layer; move the wiring up (e.g. to a cli.py of the upper package)"
