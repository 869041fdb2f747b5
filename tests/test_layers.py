"""The daemon's request path is one way down (README, "How a request travels"): each module on it
imports only the modules below it, so a lower one can reach a higher one only through a callback
it was handed. Checked on the sources' imports (those under ``if TYPE_CHECKING:`` are for types
only and run nothing)."""

from __future__ import annotations

import ast

import pytest
from support import REPO

PACKAGE = REPO / "sidecar" / "statefuld"
# Top to bottom: a request goes down this list, its answer comes back up.
PATH = ("protocol", "calls", "rpc", "watch", "liveness", "executor", "notifications", "scripts", "transports",
        "redis_mux")
# Beside the path, usable from any step: they import nothing of the path themselves.
SIDE = ("config", "errors", "metrics")


def runtime_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("statefuld."):
                found.add(child.module.removeprefix("statefuld.").split(".")[0])
            elif isinstance(child, ast.Import):
                found.update(a.name.removeprefix("statefuld.").split(".")[0] for a in child.names
                             if a.name.startswith("statefuld."))
    return found


@pytest.mark.parametrize("module", PATH)
def test_a_step_of_the_path_imports_only_what_is_below_it(module: str) -> None:
    below = set(PATH[PATH.index(module) + 1:])
    assert runtime_imports(module) <= below | set(SIDE), f"{module} imports {runtime_imports(module)}"


@pytest.mark.parametrize("module", SIDE)
def test_the_side_modules_import_nothing_of_the_path(module: str) -> None:
    assert not runtime_imports(module) & set(PATH)


def test_the_protocol_knows_no_methods_and_no_redis() -> None:
    assert not runtime_imports("protocol") & {"rpc", "redis_mux", "executor", "scripts", "transports"}
    assert '"ping"' not in (PACKAGE / "protocol.py").read_text()
