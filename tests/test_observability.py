"""Observability: the Prometheus listener after known traffic, the `stats` method and command, Redis
down/up in the gauge and the log, JSON log lines, and no TCP listener unless one is configured."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    NOBODY,
    Daemon,
    DaemonFactory,
    RawClient,
    RedisServer,
    as_root,
    call_as,
    free_port,
    reachable_by_others,
    rpc_call,
    running,
    wait_for,
)

from statefuld.metrics import BOUNDS_S, parse_addr, quantile_ms
from statefuld.rpc import METHODS
from statefuld_client import Client, InvalidArgumentError, UnavailableError, UnknownMethodError

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> Samples:
    """Every sample of the exposition (parsed by prometheus_client's own parser), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(all_samples: Samples, name: str, **labels: str) -> float:
    return all_samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_daemon(redis_server: RedisServer) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    with running(Daemon(redis_server.url, args=["--metrics-addr", f"127.0.0.1:{port}"])) as daemon:
        yield daemon, port


def test_metrics_count_known_traffic_and_parse(metrics_daemon: tuple[Daemon, int]) -> None:
    daemon, port = metrics_daemon
    with Client(daemon.socket_path, timeout_s=5) as client:
        for i in range(7):
            assert client.get_linked_pod("game", f"user-{i}", "lobby") is None
        for bad in ("a{b", "", "x}"):
            with pytest.raises(InvalidArgumentError):
                client.get_linked_pod("game", bad, "lobby")
        with pytest.raises(UnknownMethodError):
            client.call("no_such_method")
        stats = client.call("stats")

    text = scrape(port)
    got = samples(text)
    assert value(got, "statefuld_requests_total", method="get_linked_pod", code="OK") == 7
    assert value(got, "statefuld_requests_total", method="get_linked_pod", code="INVALID_ARGUMENT") == 3
    assert value(got, "statefuld_requests_total", method="get_linked_pod", code="UNAVAILABLE") == 0
    assert value(got, "statefuld_requests_total", method="unknown", code="UNKNOWN_METHOD") == 1
    # Latency of the calls that ran (the refused ones are counted above, not timed).
    assert value(got, "statefuld_request_duration_seconds_count", method="get_linked_pod") == 7
    buckets = [value(got, "statefuld_request_duration_seconds_bucket", method="get_linked_pod", le=le)
               for le in [repr(float(b)) for b in BOUNDS_S] + ["+Inf"]]
    assert buckets == sorted(buckets) and buckets[-1] == 7
    assert 0 < value(got, "statefuld_request_duration_seconds_sum", method="get_linked_pod") < 7 * 2.0
    assert value(got, "statefuld_redis_up") == 1
    assert value(got, "statefuld_connections_open") == 0
    assert value(got, "statefuld_requests_in_flight") == 0
    assert value(got, "statefuld_redis_commands_total") >= 7  # start-up's SCRIPT LOADs too
    assert 1 <= value(got, "statefuld_redis_writes_total") <= value(got, "statefuld_redis_commands_total")
    for name in ("statefuld_script_reloads_total", "statefuld_requests_shed_total", "statefuld_deadline_expired_total",
                 "statefuld_notifications_failed_total", "statefuld_internal_errors_total"):
        assert value(got, name) == 0, name
    assert value(got, "statefuld_build_info", version=stats["version"]) == 1
    assert ("process_resident_memory_bytes", ()) in got

    # The stats method saw the same numbers (it was called before the scrape, so once less for itself).
    get = stats["methods"]["get_linked_pod"]
    assert get["count"] == 10 and get["errors"] == {"INVALID_ARGUMENT": 3}
    assert sum(get["latency_buckets"]) == 7 and get["p50_ms"] > 0 and get["p99_ms"] >= get["p50_ms"]
    assert stats["methods"]["unknown"] == {**stats["methods"]["unknown"], "count": 1,
                                           "errors": {"UNKNOWN_METHOD": 1}, "p50_ms": None}
    assert stats["redis"]["up"] is True and stats["connections"] == 1 and stats["in_flight"] == 0  # not counting itself
    assert value(got, "statefuld_requests_total", method="stats", code="OK") == 1


def test_made_up_method_names_share_one_label(metrics_daemon: tuple[Daemon, int]) -> None:
    daemon, port = metrics_daemon
    with Client(daemon.socket_path, timeout_s=5) as client:
        for i in range(50):
            with pytest.raises(UnknownMethodError):
                client.call(f"made_up_{i}")
    got = samples(scrape(port))
    methods = {dict(labels)["method"] for (name, labels) in got if name == "statefuld_requests_total"}
    assert methods <= {*METHODS, "unknown"}
    assert value(got, "statefuld_requests_total", method="unknown", code="UNKNOWN_METHOD") == 50


def statefuld(*args: str, socket_path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STATEFULD_SOCKET": socket_path}
    return subprocess.run([sys.executable, "-m", "statefuld", *args], env=env, capture_output=True, text=True,
                          timeout=20)


def test_stats_command_prints_the_methods(daemon: Daemon) -> None:
    with Client(daemon.socket_path, timeout_s=5) as client:
        client.set_linked_pod("game", "alice", "lobby", 3, -1)
        client.get_linked_pod("game", "alice", "lobby")
        with pytest.raises(InvalidArgumentError):
            client.get_linked_pod("game", "alice", "lob by")
    done = statefuld("stats", socket_path=daemon.socket_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("statefuld ") and "redis up" in lines[0]
    header = next(line for line in lines if line.startswith("METHOD"))
    assert all(column in header for column in ("RATE/S", "P50", "P99", "ERRORS"))
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1:]}
    assert {"get_linked_pod", "set_linked_pod"} <= set(rows)
    assert "INVALID_ARGUMENT 1" in rows["get_linked_pod"]


def test_stats_watch_refreshes_and_stops_cleanly_on_ctrl_c(daemon: Daemon) -> None:
    env = {**os.environ, "STATEFULD_SOCKET": daemon.socket_path}
    proc = subprocess.Popen([sys.executable, "-m", "statefuld", "stats", "--watch", "--interval-s", "0.2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(daemon.socket_path, timeout_s=5) as client:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                client.get_linked_pod("game", "alice", "lobby")
                time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    tables = [t for t in out.split("\n\n") if "METHOD" in t]
    assert len(tables) >= 3
    # After the first table, rates are over the interval: get_linked_pod was called in it.
    assert "last 0.2s" in tables[-1] or "last 0.3s" in tables[-1]
    assert any("get_linked_pod" in t for t in tables[1:])


def _tcp_listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    return inodes


def _tcp_listeners_of(pid: int) -> set[str]:
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:["):-1])
    return mine & _tcp_listening_inodes()


def test_no_tcp_listener_unless_configured(daemon: Daemon, metrics_daemon: tuple[Daemon, int]) -> None:
    assert daemon.proc is not None and metrics_daemon[0].proc is not None
    assert _tcp_listeners_of(daemon.proc.pid) == set()
    # The check does see a listener where there is one.
    assert len(_tcp_listeners_of(metrics_daemon[0].proc.pid)) == 1


def test_metrics_address_in_use_or_invalid_stops_the_start(redis_server: RedisServer,
                                                            tmp_daemon: DaemonFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for addr, exit_code, message in ((f"127.0.0.1:{port}", 73, "cannot serve metrics"),
                                         ("localhost:http", 78, "metrics address")):
            daemon = tmp_daemon(redis_server.url, args=["--metrics-addr", addr])
            daemon.start(wait=False)
            assert daemon.wait() == exit_code, daemon.log()
            assert message in daemon.log()
            assert not os.path.exists(daemon.socket_path)


def events(log_text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_text.splitlines() if line.strip()]


def test_redis_down_and_up_in_the_gauge_and_one_log_line_each() -> None:
    port = free_port()
    with running(RedisServer()) as redis_server, \
            running(Daemon(redis_server.url, args=["--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json"])) \
            as daemon:
        def redis_up() -> float:
            return value(samples(scrape(port)), "statefuld_redis_up")

        with Client(daemon.socket_path, timeout_s=5) as client:
            client.set_linked_pod("game", "secret-user-id", "lobby", 3, -1)
            redis_server.stop()
            wait_for(lambda: redis_up() == 0, timeout_s=10, what="statefuld_redis_up 0")
            for _ in range(5):
                with pytest.raises(UnavailableError):
                    client.get_linked_pod("game", "secret-user-id", "lobby")
            time.sleep(1.5)  # more health checks while down: still one log line
            redis_server.start()
            wait_for(lambda: redis_up() == 1, timeout_s=10, what="statefuld_redis_up 1")
            assert client.get_linked_pod("game", "secret-user-id", "lobby") is None  # a fresh Redis
            got = samples(scrape(port))
            assert value(got, "statefuld_requests_total", method="get_linked_pod", code="UNAVAILABLE") == 5
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0

        with open(daemon.log_path) as f:
            lines = events(f.read())
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line)
    kinds = [line.get("event") for line in lines]
    assert kinds.count("redis_lost") == 1 and kinds.count("redis_recovered") == 1
    lost = lines[kinds.index("redis_lost")]
    assert lost["level"] == "warning"
    order = ["starting", "redis_connected", "metrics_listening", "listening", "redis_lost", "redis_recovered",
             "draining", "stopped"]
    assert [k for k in kinds if k in order] == order
    # User ids never reach the log at info level (or at all, here).
    assert not any("secret-user-id" in json.dumps(line) for line in lines)


def test_parse_addr_and_quantiles() -> None:
    assert parse_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_addr(":9464") == ("127.0.0.1", 9464)
    assert parse_addr("9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:9464") == ("::1", 9464)
    assert parse_addr("0.0.0.0:9464") == ("0.0.0.0", 9464)
    for bad in ("host:", "host:port", "127.0.0.1:70000", ""):
        with pytest.raises(ValueError):
            parse_addr(bad)
    empty = [0] * (len(BOUNDS_S) + 1)
    assert quantile_ms(empty, 0.5) is None
    one_ms = list(empty)
    one_ms[BOUNDS_S.index(0.001)] = 10  # ten calls in (0.5 ms, 1 ms]
    assert quantile_ms(one_ms, 0.5) == pytest.approx(0.75)
    assert quantile_ms(one_ms, 1.0) == pytest.approx(1.0)
    slow = list(empty)
    slow[-1] = 1
    assert quantile_ms(slow, 0.99) == BOUNDS_S[-1] * 1000


# --- the failure counters, provoked ----------------------------------------------------------------

# The samples a scenario's expected increments are checked on: one not expected to move must not.
WATCHED: tuple[tuple[str, dict[str, str]], ...] = (
    ("statefuld_requests_shed_total", {}),
    ("statefuld_deadline_expired_total", {}),
    ("statefuld_notifications_total", {}),
    ("statefuld_notifications_failed_total", {}),
    ("statefuld_script_reloads_total", {}),
    ("statefuld_connections_refused_total", {}),
    ("statefuld_internal_errors_total", {}),
    ("statefuld_connections_closed_malformed_total", {}),
    ("statefuld_requests_total", {"method": "get_linked_pod", "code": "OVERLOADED"}),
    ("statefuld_requests_total", {"method": "get_linked_pod", "code": "TIMEOUT"}),
    ("statefuld_requests_total", {"method": "set_linked_pod", "code": "INVALID_ARGUMENT"}),
    ("statefuld_requests_total", {"method": "set_linked_pod", "code": "OK"}),
)


def increments(before: Samples, after: Samples) -> dict[str, float]:
    """The WATCHED samples that changed, as ``name{label=value,...}`` -> increment."""
    changed = {}
    for name, labels in WATCHED:
        key = (name, tuple(sorted(labels.items())))
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        if delta:
            label_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            changed[f"{name}{{{label_text}}}" if labels else name] = delta
    return changed


def pipelined(socket_path: str, messages: list[list[Any]], timeout_s: float = 5.0) -> dict[int, Any]:
    """Send ``messages`` in one write; the error (or None) of each request, by msgid."""
    with RawClient(socket_path, timeout_s) as client:
        client.send(*messages)
        replies = client.replies(sum(1 for m in messages if m[0] == 0))
    return {msgid: error for msgid, (error, _) in replies.items()}


def test_shed_timeouts_failed_notifications_and_script_reloads_are_counted() -> None:
    port = free_port()
    args = ["--metrics-addr", f"127.0.0.1:{port}", "--max-in-flight", "2", "--request-timeout-ms", "300"]
    with running(RedisServer()) as redis_server, running(Daemon(redis_server.url, args=args)) as daemon:
        before = samples(scrape(port))

        # Redis stopped: the first two calls take the whole --max-in-flight budget and wait for
        # Redis until their deadline (TIMEOUT); the other eight, read meanwhile, are shed.
        with redis_server.paused():
            burst = [[0, i, "get_linked_pod", ["game", f"user-{i}", "lobby"]] for i in range(10)]
            codes = [error and error["code"] for _, error in sorted(pipelined(daemon.socket_path, burst).items())]
        assert codes == ["TIMEOUT"] * 2 + ["OVERLOADED"] * 8

        # A failing notification has no reply: only the counter (and the log) show it. The ping after
        # it on the same connection is answered only once the notification was handled.
        bad = [[2, "set_linked_pod", ["game", "a{b", "lobby", 1, -1]], [0, 1, "ping", []]]
        assert pipelined(daemon.socket_path, bad) == {1: None}

        # The scripts flushed behind the daemon's back: the next script call loads its script again.
        redis_server.client().script_flush()
        assert rpc_call(daemon.socket_path, "set_linked_pod", ["game", "alice", "lobby", 3, -1]) == (None, None)

        after = samples(scrape(port))
    assert increments(before, after) == {
        "statefuld_requests_shed_total": 8,
        "statefuld_deadline_expired_total": 2,
        "statefuld_notifications_total": 1,
        "statefuld_notifications_failed_total": 1,
        "statefuld_script_reloads_total": 1,
        "statefuld_requests_total{code=OVERLOADED,method=get_linked_pod}": 8,
        "statefuld_requests_total{code=TIMEOUT,method=get_linked_pod}": 2,
        "statefuld_requests_total{code=INVALID_ARGUMENT,method=set_linked_pod}": 1,
        "statefuld_requests_total{code=OK,method=set_linked_pod}": 1,
    }


@as_root
def test_refused_peers_are_counted(redis_server: RedisServer) -> None:
    port = free_port()
    args = ["--metrics-addr", f"127.0.0.1:{port}", "--allow-uid", str(NOBODY), "--socket-mode", "0666"]
    with running(Daemon(redis_server.url, args=args)) as daemon:
        reachable_by_others(daemon)  # only the allow list stops others
        before = samples(scrape(port))
        assert call_as(1, 1, daemon.socket_path, [0, 1, "ping", []]) == "closed"
        assert "connection refused: peer uid=1 gid=1" in daemon.log()
        after = samples(scrape(port))
    assert increments(before, after) == {"statefuld_connections_refused_total": 1}
    accepted = "statefuld_connections_accepted_total"
    assert value(after, accepted) - value(before, accepted) == 1


def test_liveness_and_watch_metrics(metrics_daemon: tuple[Daemon, int]) -> None:
    daemon, port = metrics_daemon
    with Client(daemon.socket_path, timeout_s=5) as client, client.hold_pod("obs", "svc", 1, "Ready", 0), \
            client.watch_service("obs", "svc") as events:
        assert next(events)["kind"] == "snapshot"
        assert client.route_user("obs", "alice", "svc", -1)["outcome"] == "placed"
        client.set_service_state("obs", "svc", 1, "Draining")
        assert next(events) == {"kind": "pod", "pod_id": 1, "state": "Draining"}
        got = samples(scrape(port))
    assert value(got, "statefuld_held_pods") == 1
    assert value(got, "statefuld_routes_total", outcome="placed") >= 1
    assert value(got, "statefuld_watches_open") == 1
    assert value(got, "statefuld_watch_events_total") >= 1
    assert value(got, "statefuld_watch_event_delay_seconds_count") >= 1
    assert 0 < value(got, "statefuld_watch_event_delay_seconds_sum") < 1.0
    assert value(got, "statefuld_watch_gaps_total", cause="slow_reader") == 0
