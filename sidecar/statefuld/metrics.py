"""What the daemon counts, how it watches Redis, and how both are shown: the `stats` method's
map and the Prometheus exposition (docs/OPERATIONS.md, "Observability", lists every metric).

A call pays only for plain ints: ``RequestMetrics`` keeps, per method, a list of counts by outcome
code and a list of latency bucket counts, incremented in place (no prometheus_client object, no
label lookup per call). ``Observer.snapshot`` reads them with the rest of the daemon's state on
the event loop; the Prometheus collector asks the loop for one snapshot per scrape, so the numbers
of one scrape agree with each other.

This module imports nothing heavy at the top: the CLI uses its helpers (``quantile_ms``) without
loading the daemon, and prometheus_client is loaded only when a listener is configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from statefuld import __version__
from statefuld.errors import CODES

if TYPE_CHECKING:
    from statefuld.calls import Calls
    from statefuld.executor import Executor
    from statefuld.liveness import Holds
    from statefuld.protocol import Connections
    from statefuld.watch import Watches

log = logging.getLogger("statefuld.metrics")

REDIS_CHECK_INTERVAL_S: Final = 1.0
_SCRAPE_TIMEOUT_S: Final = 5.0

_CODE_INDEX: Final = {code: i for i, code in enumerate(CODES)}
# Calls whose method is not in the table are counted under this one name, so a client sending
# made-up names cannot create unbounded label values.
UNKNOWN_METHOD_LABEL: Final = "unknown"
# Upper bounds (seconds) of the latency buckets; one more bucket (+Inf) follows.
BOUNDS_S: Final = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


class MethodStats:
    """One method's counts: ``codes[i]`` calls ended with CODES[i]; ``buckets[i]`` calls that ran
    took at most BOUNDS_S[i] (the last bucket: longer); ``sum_s`` their total time."""

    __slots__ = ("buckets", "codes", "sum_s")

    def __init__(self) -> None:
        self.codes = [0] * len(CODES)
        self.buckets = [0] * (len(BOUNDS_S) + 1)
        self.sum_s = 0.0


class RequestMetrics:
    """Per-method counts of every call (requests and notifications), by outcome code; calls that
    ran (not refused at once) also by latency, from the read that brought them to their end."""

    def __init__(self, method_names: Iterable[str]) -> None:
        self.by_method: dict[str, MethodStats] = {name: MethodStats() for name in method_names}
        self.unknown = MethodStats()

    def count(self, method: str, code: str, seconds: float | None) -> None:
        stats = self.by_method.get(method, self.unknown)
        stats.codes[_CODE_INDEX[code]] += 1
        if seconds is not None:
            stats.buckets[bisect_left(BOUNDS_S, seconds)] += 1
            stats.sum_s += seconds

    def total(self, code: str) -> int:
        """Calls of every method that ended with ``code``."""
        index = _CODE_INDEX[code]
        return sum(stats.codes[index] for _, stats in self.items())

    def items(self) -> Iterator[tuple[str, MethodStats]]:
        yield from self.by_method.items()
        yield UNKNOWN_METHOD_LABEL, self.unknown


def quantile_ms(buckets: list[int], q: float, bounds_s: tuple[float, ...] | list[float] = BOUNDS_S) -> float | None:
    """The q-quantile (0..1) of a latency histogram in milliseconds, interpolated inside its
    bucket as Prometheus' histogram_quantile does; None without observations. A quantile in the
    last (+Inf) bucket is reported as the highest finite bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(bounds_s):
                return bounds_s[-1] * 1000
            lower = bounds_s[i - 1] if i > 0 else 0.0
            return (lower + (bounds_s[i] - lower) * (rank - seen) / n) * 1000
        seen += n
    return bounds_s[-1] * 1000


# --- Redis up/down --------------------------------------------------------------------------------


class RedisWatch:
    """Asks Redis every REDIS_CHECK_INTERVAL_S (``Executor.health``: a PING, bounded) and keeps
    ``up`` for the gauge. Logs each transition once (lost, recovered), never per request; also
    each failover the transport followed (its ``switches``: a Sentinel switch to another primary,
    Redis Cluster slots taken over by another primary). Its PING also makes a lost connection be
    re-established while no request arrives."""

    def __init__(self, executor: Executor, interval_s: float = REDIS_CHECK_INTERVAL_S) -> None:
        self._executor = executor
        self._interval_s = interval_s
        self.up = True  # the daemon starts only once Redis answered
        self.transitions = 0
        self._down_since = 0.0
        self._switches = self._primary_switches()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception:  # a bug here must not end the watch (nor the daemon)
                log.exception("Redis health check failed")

    async def check(self) -> None:
        try:
            health = await self._executor.health()
        except Exception as exc:  # health() maps Redis' failures itself: anything else is a bug
            health = {"ready": False, "redis": f"health check failed: {type(exc).__name__}: {exc}"}
        ready = health.get("ready") is True
        if ready != self.up:
            self.up = ready
            self.transitions += 1
            now = time.monotonic()
            if ready:
                log.info("Redis recovered after %.1fs down", now - self._down_since,
                         extra={"event": "redis_recovered"})
            else:
                self._down_since = now
                log.warning("Redis lost: %s", health.get("redis"), extra={"event": "redis_lost"})
        switches = self._primary_switches()
        if switches > self._switches:
            log.warning("Redis failover followed: %s", self._executor.describe_transport(),
                        extra={"event": "redis_failover"})
        self._switches = switches

    def _primary_switches(self) -> int:
        return int(self._executor.transport_stats().get("switches", 0))


# --- the snapshot ---------------------------------------------------------------------------------


class Observer:
    """The daemon's numbers in one map: the `stats` method's result, and what a scrape exports."""

    def __init__(self, calls: Calls, connections: Connections, executor: Executor, redis: RedisWatch,
                 holds: Holds, watches: Watches) -> None:
        self._holds = holds
        self._watches = watches
        self._calls = calls
        self._connections = connections
        self._executor = executor
        self._redis = redis
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """Everything, read in one go on the event loop. Methods never called are left out."""
        calls, connections = self._calls, self._connections
        methods: dict[str, Any] = {}
        for name, stats in calls.metrics.items():
            count = sum(stats.codes)
            if not count:
                continue
            buckets = list(stats.buckets)
            methods[name] = {
                "count": count,
                "errors": {CODES[i]: n for i, n in enumerate(stats.codes) if i != 0 and n},
                "p50_ms": quantile_ms(buckets, 0.50),
                "p99_ms": quantile_ms(buckets, 0.99),
                "latency_buckets": buckets,
                "latency_sum_ms": stats.sum_s * 1000,
            }
        transport = self._executor.transport_stats()
        holds = self._holds
        return {
            "version": __version__,
            "start_time_s": self.started_at,
            "uptime_s": time.monotonic() - self._started_monotonic,
            "methods": methods,
            "latency_bounds_ms": [b * 1000 for b in BOUNDS_S],
            "in_flight": len(calls.in_flight),
            "connections": len(connections.open),
            "buffered_bytes": connections.buffered,
            "redis": {
                "up": self._redis.up,
                "commands": int(transport.get("commands", 0)),
                "writes": int(transport.get("writes", 0)),
                "primary_switches": int(transport.get("switches", 0)),
                "script_reloads": self._executor.script_reloads,
            },
            "liveness": {
                "held_pods": len(holds.pods),
                "heartbeats": holds.heartbeats,
                "heartbeat_failures": holds.heartbeat_failures,
                "downs_written": holds.downs_written,
                "routes": dict(self._executor.route_outcomes),
            },
            "watch": {
                "open": self._watches.open,
                "events_sent": self._watches.events_sent,
                "gaps": dict(self._watches.gaps),
                "read_failures": self._watches.read_failures,
                "subscription_reconnects": self._watches.notifications.reconnects,
                "delay_buckets": list(self._watches.delay_buckets),
                "delay_sum_ms": self._watches.delay_sum_s * 1000,
                "delay_p50_ms": quantile_ms(self._watches.delay_buckets, 0.50),
                "delay_p99_ms": quantile_ms(self._watches.delay_buckets, 0.99),
            },
            "counters": {
                "requests": calls.requests,
                "notifications": calls.notifications,
                "overloaded": calls.metrics.total("OVERLOADED"),
                "timeouts": calls.metrics.total("TIMEOUT"),
                "internal_errors": calls.metrics.total("INTERNAL"),
                "notification_failures": calls.notification_failures,
                "connections_closed_malformed": connections.closed_malformed,
                "connections_accepted": connections.accepted,
                "connections_refused": connections.refused,
                "connections_over_limit": connections.over_limit,
                "connections_closed_buffered": connections.closed_buffered,
            },
        }


# --- Prometheus ------------------------------------------------------------------------------------

# (name without _total, help, key in snapshot["counters"])
_COUNTERS: Final = (
    ("statefuld_deadline_expired", "Calls answered TIMEOUT because their deadline passed.", "timeouts"),
    ("statefuld_requests_shed", "Calls refused OVERLOADED because --max-in-flight calls were running.", "overloaded"),
    ("statefuld_notifications", "Notifications received (calls that are never answered).", "notifications"),
    ("statefuld_notifications_failed", "Notifications that failed (logged, at most one line a second).",
     "notification_failures"),
    ("statefuld_internal_errors", "Calls that failed with INTERNAL (a bug or an unexpected Redis reply).",
     "internal_errors"),
    ("statefuld_connections_accepted", "Connections accepted on the socket.", "connections_accepted"),
    ("statefuld_connections_refused", "Connections closed at once: peer not in --allow-uid/--allow-gid.",
     "connections_refused"),
    ("statefuld_connections_closed_malformed", "Connections closed for breaking the protocol.",
     "connections_closed_malformed"),
    ("statefuld_connections_over_limit", "Connections closed at once: --max-connections were open.",
     "connections_over_limit"),
    ("statefuld_connections_closed_buffered",
     "Connections closed for taking the incomplete messages held past --max-buffered-bytes.",
     "connections_closed_buffered"),
)


def families(snap: dict[str, Any]) -> list[Any]:
    """The snapshot as prometheus_client metric families."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    requests = CounterMetricFamily(
        "statefuld_requests", "Calls (requests and notifications) by method and outcome code.",
        labels=("method", "code"))
    duration = HistogramMetricFamily(
        "statefuld_request_duration_seconds",
        "Time from reading a call to queueing its reply, for calls that ran (not refused at once).",
        labels=("method",))
    bounds = [_le(b) for b in BOUNDS_S] + ["+Inf"]
    for method, m in snap["methods"].items():
        errors = m["errors"]
        requests.add_metric((method, "OK"), m["count"] - sum(errors.values()))
        for code in CODES[1:]:
            requests.add_metric((method, code), errors.get(code, 0))
        duration.add_metric((method,), _cumulative(bounds, m["latency_buckets"]), m["latency_sum_ms"] / 1000)
    result: list[Any] = [requests, duration]

    def gauge(name: str, doc: str, value: float) -> None:
        result.append(GaugeMetricFamily(name, doc, value=value))

    def counter(name: str, doc: str, value: float) -> None:
        result.append(CounterMetricFamily(name, doc, value=value))

    redis = snap["redis"]
    gauge("statefuld_requests_in_flight", "Calls being executed now, daemon-wide.", snap["in_flight"])
    gauge("statefuld_connections_open", "Client connections open now.", snap["connections"])
    gauge("statefuld_buffered_bytes", "Bytes of incomplete messages held across connections now.",
          snap["buffered_bytes"])
    gauge("statefuld_redis_up", "1 while Redis answers the daemon's health check (every second), else 0.",
          1 if redis["up"] else 0)
    counter("statefuld_redis_commands", "Commands sent to Redis.", redis["commands"])
    counter("statefuld_redis_writes", "Socket writes to Redis (round trips); commands / writes is the mean batch.",
            redis["writes"])
    counter("statefuld_redis_primary_switches",
            "Times the daemon moved to another primary: a Sentinel failover, or a Redis Cluster primary's slots "
            "served by another (failover, resharding).", redis["primary_switches"])
    counter("statefuld_script_reloads", "Lua scripts loaded again after NOSCRIPT (Redis restart, flush, failover).",
            redis["script_reloads"])
    for name, doc, key in _COUNTERS:
        counter(name, doc, snap["counters"].get(key, 0))
    liveness = snap["liveness"]
    gauge("statefuld_held_pods", "Pods held through this daemon now (hold_pod).", liveness["held_pods"])
    counter("statefuld_heartbeats", "Load reports of held pods written.", liveness["heartbeats"])
    counter("statefuld_heartbeat_failures", "Heartbeats that Redis did not take (logged, one line a second).",
            liveness["heartbeat_failures"])
    counter("statefuld_pod_downs", "Down states written because a pod's last holder disconnected.",
            liveness["downs_written"])
    routes = CounterMetricFamily("statefuld_routes", "route_user answers by outcome.", labels=("outcome",))
    for outcome, n in liveness["routes"].items():
        routes.add_metric((outcome,), n)
    result.append(routes)
    watch = snap["watch"]
    gauge("statefuld_watches_open", "Watches open on this daemon now.", watch["open"])
    counter("statefuld_watch_events", "Watch events sent.", watch["events_sent"])
    gaps = CounterMetricFamily("statefuld_watch_gaps", "snapshot/gap events owed, by cause: slow_reader (a "
                               "watcher's queue overflowed), resubscribe (the subscription to Redis was "
                               "interrupted, the topology changed, or a read failed).", labels=("cause",))
    for cause, n in watch["gaps"].items():
        gaps.add_metric((cause,), n)
    result.append(gaps)
    counter("statefuld_watch_subscription_reconnects", "Watch subscriptions to Redis made again after a loss.",
            watch["subscription_reconnects"])
    delay = HistogramMetricFamily("statefuld_watch_event_delay_seconds",
                                  "From a keyspace notification's arrival to its event's send.")
    delay.add_metric((), _cumulative(bounds, watch["delay_buckets"]), watch["delay_sum_ms"] / 1000)
    result.append(delay)
    gauge("statefuld_start_time_seconds", "Start time of the daemon, seconds since the epoch.", snap["start_time_s"])
    info = GaugeMetricFamily("statefuld_build_info", "The daemon's version (value 1).", labels=("version",))
    info.add_metric((snap["version"],), 1)
    result.append(info)
    return result


def _cumulative(bounds: list[str], buckets: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as Prometheus wants them: (le, observations at most that)."""
    cumulative, running = [], 0
    for le, n in zip(bounds, buckets, strict=True):
        running += n
        cumulative.append((le, running))
    return cumulative


def _le(bound: float) -> str:
    return repr(float(bound))


class _Collector:
    """Takes one snapshot on the event loop per scrape (the listener runs in its own thread)."""

    def __init__(self, observer: Observer, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = observer
        self._loop = loop

    def collect(self) -> list[Any]:
        result: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(self._observer.snapshot())
            except BaseException as exc:
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(take)
        return families(result.result(timeout=_SCRAPE_TIMEOUT_S))


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or ``:port``/``port`` for 127.0.0.1. Raises ValueError."""
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        host, port_text = "", addr
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics address {addr!r}: expected host:port with a port in 0..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsListener:
    """The /metrics HTTP listener (prometheus_client's, in a thread of its own)."""

    def __init__(self, observer: Observer, addr: str) -> None:
        self._observer = observer
        self.host, self.port = parse_addr(addr)
        self._server: Any = None
        self._thread: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self._observer, loop))
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=registry)
        self.port = int(self._server.server_address[1])
        where = f"http://{_host_for_url(self.host)}:{self.port}/metrics"
        if is_loopback(self.host):
            log.info("metrics on %s", where, extra={"event": "metrics_listening"})
        else:
            log.info("metrics on %s, reachable from the network (counters only: no user ids, keys or states)",
                     where, extra={"event": "metrics_listening"})

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=_SCRAPE_TIMEOUT_S)
            self._server = None


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
