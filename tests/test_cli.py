"""The operator commands: `statefuld ping`, `health` and `call`, as probes and scripts use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import Daemon, RedisServer, running, short_tmpdir


def statefuld(*args: str, socket_path: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STATEFULD_SOCKET": socket_path}
    return subprocess.run(
        [sys.executable, "-m", "statefuld", *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def test_ping_prints_pong(daemon: Daemon) -> None:
    done = statefuld("ping", socket_path=daemon.socket_path)
    assert (done.returncode, done.stdout.strip()) == (0, "PONG")


def test_ping_without_a_daemon_fails_with_a_clear_message() -> None:
    directory = short_tmpdir()
    missing = os.path.join(directory, "nobody.sock")
    try:
        done = statefuld("ping", "--timeout-s", "1", socket_path=missing)
    finally:
        os.rmdir(directory)
    assert done.returncode == 1
    assert missing in done.stderr


def test_methods_lists_every_method_with_its_parameters(daemon: Daemon) -> None:
    listed = statefuld("methods", socket_path=daemon.socket_path).stdout.splitlines()
    assert "get_linked_pod ns uid service" in listed and "ping" in listed
    assert len(listed) == len(set(listed)) >= 20
    assert "get_linked_pod ns uid service" in statefuld("call", "--help", socket_path=daemon.socket_path).stdout


def test_an_argument_read_as_a_number_says_how_to_quote_it(daemon: Daemon) -> None:
    done = statefuld("call", "get_linked_pod", "game", "12345", "lobby", socket_path=daemon.socket_path)
    assert done.returncode == 1
    assert "uid must be a string, got int" in done.stderr and """'"12345"'""" in done.stderr


def test_call_takes_json_or_plain_arguments_and_prints_json(daemon: Daemon) -> None:
    sock = daemon.socket_path
    assert statefuld("call", "set_linked_pod", "game", "alice", "lobby", "3", "-1", socket_path=sock).stdout.strip() \
        == "null"
    # A uid made of digits is passed quoted, as JSON, to stay a string.
    assert statefuld("call", "set_linked_pod", "game", '"12345"', "lobby", "4", "60", socket_path=sock).returncode == 0
    got = statefuld("call", "batch_get_linked_pod", "game", '["alice", "12345", "nobody"]', "lobby", socket_path=sock)
    assert json.loads(got.stdout) == {"3": ["alice"], "4": ["12345"]}
    assert json.loads(statefuld("call", "try_set_linked_pod", "game", "alice", "lobby", "5", "-1",
                                socket_path=sock).stdout) == [False, 3]


def test_call_reports_the_daemons_error_and_exits_1(daemon: Daemon) -> None:
    done = statefuld("call", "set_linked_pod", "game", "alice", "lobby", "-5", "-1", socket_path=daemon.socket_path)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "pod_id" in done.stderr
    done = statefuld("call", "no_such_method", socket_path=daemon.socket_path)
    assert done.returncode == 1 and "UNKNOWN_METHOD" in done.stderr


def test_health_exit_code_follows_redis_reachability() -> None:
    with running(RedisServer()) as redis_server, running(Daemon(redis_server.url)) as daemon:
        ready = statefuld("health", socket_path=daemon.socket_path)
        assert ready.returncode == 0
        assert json.loads(ready.stdout)["ready"] is True
        redis_server.stop()
        down = statefuld("health", socket_path=daemon.socket_path)
        assert down.returncode == 1
        assert json.loads(down.stdout)["ready"] is False
        # ping is liveness: the daemon itself is fine while Redis is away.
        assert statefuld("ping", socket_path=daemon.socket_path).returncode == 0


def test_call_serves_placement(daemon: Daemon) -> None:
    sock = daemon.socket_path
    for pod in ("1", "2"):
        assert statefuld("call", "set_service_state", "game", "lobby", pod, "Ready", socket_path=sock).returncode == 0
    # Only pod 1 reports a load, so only pod 1 is eligible: the pick is deterministic.
    reported = statefuld("call", "report_pod_load", "game", "lobby", "1", "0", socket_path=sock)
    assert (reported.returncode, reported.stdout.strip()) == (0, "null")
    linked = statefuld("call", "compute_linked_pod", "game", "alice", "lobby", "-1", socket_path=sock)
    assert (linked.returncode, json.loads(linked.stdout)) == (0, 1)
    nobody = statefuld("call", "compute_linked_pod", "game", "bob", "chat", "-1", socket_path=sock)
    assert (nobody.returncode, nobody.stdout.strip()) == (0, "null")
    bad = statefuld("call", "report_pod_load", "game", "lobby", "2", "-3", socket_path=sock)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "load" in bad.stderr


def test_call_routes_users_and_pods_shows_why(daemon: Daemon) -> None:
    sock = daemon.socket_path
    for pod, state in (("1", "Ready"), ("2", "Draining"), ("3", "Down")):
        assert statefuld("call", "set_service_state", "game", "lobby", pod, state, socket_path=sock).returncode == 0
        assert statefuld("call", "report_pod_load", "game", "lobby", pod, "4", socket_path=sock).returncode == 0
    assert statefuld("call", "set_linked_pod", "game", "alice", "lobby", "3", "-1", socket_path=sock).returncode == 0
    routed = statefuld("call", "route_user", "game", "alice", "lobby", "-1", socket_path=sock)
    assert (routed.returncode, json.loads(routed.stdout)) == (0, {"pod_id": 1, "previous": 3, "outcome": "moved"})

    table = statefuld("pods", "game", "lobby", socket_path=sock)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["POD", "STATE", "LOAD", "REPORT", "AGE", "STATUS", "WHY"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["1"][1:3] == ["Ready", "5"] and rows["1"][4] == "eligible"  # 4, and alice counted in
    assert rows["2"][4] == "alive" and "not routable" in lines[2]
    assert rows["3"][4] == "gone" and "gone state" in lines[3]

    as_json = json.loads(statefuld("pods", "--json", "game", "lobby", socket_path=sock).stdout)
    assert [(p["pod_id"], p["status"]) for p in as_json] == [(1, "eligible"), (2, "alive"), (3, "gone")]
    empty = statefuld("pods", "game", "nothing", socket_path=sock)
    assert (empty.returncode, empty.stdout.splitlines()[-1]) == (0, "(no pods)")
