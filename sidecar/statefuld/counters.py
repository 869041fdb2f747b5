"""The counters every call increments: per method, by outcome code, with a latency histogram.

metrics.py shows them (the `stats` map, the Prometheus exposition); this module only counts. It
is small and plain on purpose: the compiled build compiles it with the hot path (build.py), so
``MethodStats.done`` is a few native increments instead of attribute lookups on a Python object.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Final

# Outcome codes, "OK" first; the wire's error codes after it (docs/PROTOCOL.md).
CODES: Final = ("OK", "INVALID_ARGUMENT", "UNKNOWN_METHOD", "UNAVAILABLE", "TIMEOUT", "OVERLOADED", "INTERNAL")
CODE_INDEX: Final = {code: i for i, code in enumerate(CODES)}
OK: Final = 0
INTERNAL: Final = CODE_INDEX["INTERNAL"]
OVERLOADED: Final = CODE_INDEX["OVERLOADED"]
# Calls whose method is not in the table are counted under this one name, so a client sending
# made-up names cannot create unbounded label values.
UNKNOWN_METHOD_LABEL: Final = "unknown"

# Upper bounds (seconds) of the latency buckets; one more bucket (+Inf) follows. A get_linked_pod
# takes tens of microseconds in the daemon when idle, about a millisecond under heavy load.
# Typed as a tuple of any length: for a fixed-length tuple of floats the compiled build keeps 18
# unboxed doubles, and its check that they were set is inverted, a NameError at every read
# (mypyc/mypyc#1183, open).
BOUNDS_S: Final[tuple[float, ...]] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


class MethodStats:
    """One method's counts: ``codes[i]`` calls ended with CODES[i]; ``buckets[i]`` calls that were
    executed took at most BOUNDS_S[i] (the last bucket: longer); ``sum_s`` their total time."""

    __slots__ = ("_bounds_s", "buckets", "codes", "sum_s")

    def __init__(self) -> None:
        self.codes = [0] * len(CODES)
        self.buckets = [0] * (len(BOUNDS_S) + 1)
        self.sum_s = 0.0
        self._bounds_s: list[float] = list(BOUNDS_S)

    def done(self, code: int, seconds: float) -> None:
        """An executed call ended (the hot path: a few int increments)."""
        self.codes[code] += 1
        self.buckets[bisect_left(self._bounds_s, seconds)] += 1
        self.sum_s += seconds


class RequestMetrics:
    """Per-method counts of every call (requests and notifications). Calls refused before they
    run (bad arguments, unknown method, shed) are counted by ``count``; calls that ran, whatever
    their outcome, by their method's ``MethodStats.done`` with their latency, from the read that
    brought them to the reply being queued (protocol.RpcProtocol._done)."""

    def __init__(self, method_names: Iterable[str]) -> None:
        self.by_method: dict[str, MethodStats] = {name: MethodStats() for name in method_names}
        self.unknown = MethodStats()

    def count(self, method: str, code: int) -> None:
        self.by_method.get(method, self.unknown).codes[code] += 1

    def items(self) -> Iterator[tuple[str, MethodStats]]:
        yield from self.by_method.items()
        yield UNKNOWN_METHOD_LABEL, self.unknown


def code_index(error: dict[str, str]) -> int:
    return CODE_INDEX.get(error.get("code", "INTERNAL"), INTERNAL)
