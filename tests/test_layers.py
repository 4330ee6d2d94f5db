"""The package's layers, checked on the source: a lower layer never imports a higher one.

storage -> sync -> protocol (the scheduler-worker contract) -> worker, actors, backends -> client
-> cli. ``smlt.errors``, ``smlt.task`` and ``smlt.sample_random`` (the user's contract) sit
below all of them. Worker, actors and backends are peers that talk only through the protocol:
the scheduler never reaches into the worker's package, and the worker knows nothing of who
invoked it (actors may use the backend contract, which is how they invoke). The emulator is a
tool beside the backends that imports none of its peers: it runs the worker only by name, in
its subprocess containers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SMLT = Path(__file__).resolve().parent.parent / "smlt"

RANK = {
    "__version__": 0,  # a constant of the package itself (``smlt --version`` reads it)
    "errors": 0,
    "task": 0,
    "sample_random": 0,  # SampleRandom, what Task.transform is given: part of the contract
    "storage": 1,
    "sync": 2,
    "protocol": 3,
    "optimizer": 3,
    "worker": 4,
    "actors": 4,
    "backends": 4,
    "emulator": 4,
    "client": 5,
    "cli": 6,
    "__main__": 7,
}
# Peers of one rank that must not import each other (importer -> forbidden).
FORBIDDEN = {
    "worker": {"actors", "backends"},
    "backends": {"worker", "actors"},
    "actors": {"worker"},
    "emulator": {"worker", "actors", "backends"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "smlt" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # ``from smlt import errors`` names a layer in the alias.
            if node.module == "smlt":
                found += [f"smlt.{alias.name}" for alias in node.names]
    return found


SOURCES = sorted(p for p in SMLT.rglob("*.py") if p.name != "__init__.py" or p.parent != SMLT)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SMLT)))
def test_module_imports_only_lower_layers(path: Path) -> None:
    own = path.relative_to(SMLT).with_suffix("").parts[0]
    assert own in RANK, f"{path} is in no known layer; add it to RANK"
    wrong = []
    for module in _imports(path):
        layer = _layer(module)
        if layer is None or layer == own:
            continue
        assert layer in RANK, f"{path} imports {module}, which is in no known layer"
        if RANK[layer] > RANK[own] or layer in FORBIDDEN.get(own, set()):
            wrong.append(module)
    assert not wrong, f"smlt/{path.relative_to(SMLT)} ({own}) imports {wrong}"
