"""Which build of statefuld is running: the .py files, or the compiled wheel.

The compiled build (scripts/build-compiled, docs/DEPLOYMENT.md "The compiled build") is the same
package with the modules every request runs through compiled to C extensions by mypyc; the
Docker image ships it. ``kind`` tells them apart at run time, for the `stats` map, the metrics and
the start-up log, so a benchmark or an incident report always says which one it was.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from typing import Final

# The modules the compiled build compiles: sidecar/pyproject.toml's mypyc hook names the same
# files (tests/test_build.py holds the two lists together).
COMPILED_MODULES: Final = (
    "statefuld.counters",
    "statefuld.errors",
    "statefuld.executor",
    "statefuld.protocol",
    "statefuld.redis_mux",
    "statefuld.rpc",
)

COMPILED: Final = "compiled"
INTERPRETED: Final = "interpreted"
# Some modules compiled, some not: a .so left beside the sources by an in-place build, most
# likely, shadowing the .py files next to it. Works, but is not what anyone meant to run.
MIXED: Final = "mixed"


def _is_extension(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def kind() -> str:
    """COMPILED, INTERPRETED or MIXED (imports the compiled modules if they are not yet)."""
    compiled = [_is_extension(name) for name in COMPILED_MODULES]
    if all(compiled):
        return COMPILED
    return MIXED if any(compiled) else INTERPRETED


def module_files() -> dict[str, str]:
    """Where each of COMPILED_MODULES was loaded from (for the MIXED warning)."""
    return {name: getattr(sys.modules[name], "__file__", None) or "?" for name in COMPILED_MODULES
            if name in sys.modules}
