"""Start-up and shut-down of a real daemon: drain, forced exit, socket safety, exit codes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from support import (
    NS,
    SVC,
    Daemon,
    DaemonFactory,
    RawClient,
    RedisServer,
    free_port,
    in_flight,
    redis_server_binary,
    rpc_call,
    running,
    short_tmpdir,
    wait_for,
)

Raw = Callable[..., RawClient]

EXIT_REDIS_UNAVAILABLE = 69
EXIT_SOCKET_IN_USE = 73
EXIT_CONFIG = 78


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running(RedisServer()) as server:
        yield server


def connect_refused(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


def test_sigterm_drains_requests_in_flight_then_exits_0(own_redis: RedisServer, raw: Raw,
                                                        start: Callable[[Daemon], Daemon]) -> None:
    args = ["--request-timeout-ms", "10000", "--drain-timeout-s", "10"]
    daemon = start(Daemon(own_redis.url, args=args))
    c = raw(daemon.socket_path, timeout_s=10)
    with own_redis.paused():
        for i in range(5):
            c.request(i, "set_linked_pod", [NS, f"user{i}", SVC, i, -1])
        wait_for(lambda: in_flight(daemon.socket_path) == 5, what="the requests in the daemon, waiting on Redis")
        daemon.signal(signal.SIGTERM)
        # Draining: the listener is closed at once, the process stays for the requests in flight.
        wait_for(lambda: connect_refused(daemon.socket_path), timeout_s=5, what="listener closed")
        assert daemon.proc is not None and daemon.proc.poll() is None
    assert c.replies(5) == {i: (None, None) for i in range(5)}
    assert daemon.wait(10) == 0
    assert own_redis.client().get(f"sf:{{{NS}:lk:user3}}{SVC}") == "3"  # written, acknowledged
    assert not os.path.exists(daemon.socket_path)


def test_sighup_stops_as_sigterm_does(redis_server: RedisServer, start: Callable[[Daemon], Daemon]) -> None:
    # The terminal the daemon was started from closed: a clean stop, socket removed, exit 0.
    daemon = start(Daemon(redis_server.url))
    daemon.signal(signal.SIGHUP)
    assert daemon.wait(10) == 0
    assert not os.path.exists(daemon.socket_path)
    assert "received SIGHUP: shutting down" in daemon.log()


def test_requests_still_in_flight_after_the_drain_bound_are_answered_unavailable(
        own_redis: RedisServer, raw: Raw, start: Callable[[Daemon], Daemon]) -> None:
    args = ["--request-timeout-ms", "10000", "--drain-timeout-s", "0.3"]
    daemon = start(Daemon(own_redis.url, args=args))
    c = raw(daemon.socket_path, timeout_s=10)
    with own_redis.paused():
        c.request(1, "get_linked_pod", [NS, "alice", SVC])
        wait_for(lambda: in_flight(daemon.socket_path) == 1, what="the request in the daemon")
        daemon.signal(signal.SIGTERM)
        error, _ = c.replies(1)[1]
        assert error["code"] == "UNAVAILABLE"
    assert daemon.wait(10) == 0
    assert not os.path.exists(daemon.socket_path)


def test_second_signal_forces_exit_and_still_removes_the_socket(own_redis: RedisServer, raw: Raw,
                                                                start: Callable[[Daemon], Daemon]) -> None:
    args = ["--request-timeout-ms", "30000", "--drain-timeout-s", "30"]
    daemon = start(Daemon(own_redis.url, args=args))
    c = raw(daemon.socket_path)
    with own_redis.paused():
        c.request(1, "get_linked_pod", [NS, "alice", SVC])
        wait_for(lambda: in_flight(daemon.socket_path) == 1, what="the request in the daemon")
        daemon.signal(signal.SIGTERM)
        # Draining (it would wait 30 s): the listener closes at once, the process stays.
        wait_for(lambda: connect_refused(daemon.socket_path), timeout_s=5, what="listener closed")
        assert daemon.proc is not None and daemon.proc.poll() is None
        started = time.monotonic()
        daemon.signal(signal.SIGINT)
        code = daemon.wait(5)
    assert code != 0
    assert time.monotonic() - started < 3
    assert not os.path.exists(daemon.socket_path)


def test_socket_is_0660_by_default_and_removed_at_exit(redis_server: RedisServer) -> None:
    with running(Daemon(redis_server.url)) as daemon:
        mode = os.lstat(daemon.socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert daemon.stop() == 0
        assert not os.path.exists(daemon.socket_path)


def test_socket_mode_option(redis_server: RedisServer) -> None:
    with running(Daemon(redis_server.url, args=["--socket-mode", "0600"])) as daemon:
        assert stat.S_IMODE(os.lstat(daemon.socket_path).st_mode) == 0o600


def test_missing_socket_directory_is_created_not_writable_by_others(redis_server: RedisServer) -> None:
    daemon = Daemon(redis_server.url)
    daemon.socket_path = os.path.join(daemon.dir, "run", "statefuld", "s.sock")
    with running(daemon):
        mode = stat.S_IMODE(os.stat(os.path.dirname(daemon.socket_path)).st_mode)
        assert mode & 0o022 == 0
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")


def test_stale_socket_is_replaced(redis_server: RedisServer) -> None:
    daemon = Daemon(redis_server.url)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(daemon.socket_path)  # a socket file nobody listens on, as a killed daemon leaves
    dead.close()
    with running(daemon):
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")
        assert "stale socket" in daemon.log()


def test_live_socket_is_not_stolen(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    with running(Daemon(redis_server.url)) as first:
        second = tmp_daemon(redis_server.url, dir=short_tmpdir())
        second.socket_path = first.socket_path
        second.start(wait=False)
        assert second.wait(15) == EXIT_SOCKET_IN_USE
        assert "another process" in second.log()
        assert rpc_call(first.socket_path, "ping", []) == (None, "PONG")
        assert stat.S_ISSOCK(os.lstat(first.socket_path).st_mode)


def test_redis_unreachable_at_start_exits_69_quickly_without_a_socket(tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon("unix:///nonexistent/redis.sock", args=["--startup-timeout-s", "0.5"])
    started = time.monotonic()
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_REDIS_UNAVAILABLE
    assert time.monotonic() - started < 8
    assert not os.path.exists(daemon.socket_path)
    assert "unavailable" in daemon.log().lower()


def test_symlink_at_the_socket_path_is_refused(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    target = os.path.join(daemon.dir, "elsewhere")
    os.symlink(target, daemon.socket_path)
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert os.path.islink(daemon.socket_path) and not os.path.exists(target)
    assert "symbolic link" in daemon.log()


def test_socket_directory_writable_by_others_is_refused(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    os.chmod(daemon.dir, 0o777)
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert not os.path.exists(daemon.socket_path)
    assert "writable by group or others" in daemon.log()


def test_sticky_shared_directory_is_accepted(redis_server: RedisServer) -> None:
    daemon = Daemon(redis_server.url)
    os.chmod(daemon.dir, 0o1777)  # as /tmp: others cannot remove or rename our socket
    with running(daemon):
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")


def test_sigterm_during_startup_exits_0_without_a_socket(tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon("unix:///nonexistent/redis.sock", args=["--startup-timeout-s", "30"])
    daemon.start(wait=False)
    wait_for(lambda: "not ready yet" in daemon.log(), what="the start-up retries")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not os.path.exists(daemon.socket_path)


def test_a_redis_that_wants_a_password_stops_the_start_at_once_with_the_fix(tmp_daemon: DaemonFactory,
                                                                          start: Callable[[RedisServer], RedisServer]
                                                                          ) -> None:
    server = start(RedisServer())
    server.client().config_set("requirepass", "s3cret-pw")
    daemon = tmp_daemon(server.url, args=["--startup-timeout-s", "30"])
    started = time.monotonic()
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert time.monotonic() - started < 10  # not after 30 s of retries that cannot help
    errors = [line for line in daemon.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "set STATEFULD_REDIS_PASSWORD or --redis-password-file" in errors[0]
    assert "Traceback" not in daemon.log()


def test_a_sentinel_named_as_a_redis_stops_the_start_at_once_with_the_fix(tmp_daemon: DaemonFactory) -> None:
    directory = short_tmpdir("sfs-")
    port = free_port()
    conf = os.path.join(directory, "sentinel.conf")
    with open(conf, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\ndir {directory}\nsentinel monitor m 127.0.0.1 1 1\n")
    sentinel = subprocess.Popen([redis_server_binary(), conf, "--sentinel", "--daemonize", "no"],
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: connect_refused_tcp(port) is False, what="the sentinel listening")
        daemon = tmp_daemon(f"redis://127.0.0.1:{port}", args=["--startup-timeout-s", "30"])
        daemon.start(wait=False)
        assert daemon.wait(15) == EXIT_CONFIG
        errors = [line for line in daemon.log().splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "redis+sentinel://HOST:PORT" in errors[0], errors
    finally:
        sentinel.kill()
        sentinel.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def connect_refused_tcp(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False
