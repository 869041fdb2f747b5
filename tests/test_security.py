"""Who may reach the daemon, and what it never reveals.

- the socket: its mode and group, the directory it lives in, nothing planted at its path followed;
- peers checked by SO_PEERCRED (--allow-uid / --allow-gid), refused ones cut and logged;
- the Redis password (environment or file, ACL user names) never in argv, ps, logs or errors;
- user ids and states not in the log at info level.

Connecting as another user needs root (to switch uid) and the system python3.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from support import (
    NOBODY,
    Daemon,
    DaemonFactory,
    RedisServer,
    as_root,
    call_as,
    reachable_by_others,
    rpc_call,
    running,
    short_tmpdir,
)

EXIT_REDIS_UNAVAILABLE = 69
EXIT_CONFIG = 78
NS, SVC = "sec", "lobby"


def shared_gid() -> int:
    """A group other than root's and nobody's, for socket-group and allow-gid tests."""
    return grp.getgrnam("www-data").gr_gid if _has_group("www-data") else 33


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True




# --- the socket file and its directory -----------------------------------------------------------


@as_root
def test_socket_group_gets_in_and_others_do_not(redis_server: RedisServer) -> None:
    gid = shared_gid()
    daemon = reachable_by_others(Daemon(redis_server.url, args=["--socket-group", str(gid)]))
    with running(daemon):
        info = os.lstat(daemon.socket_path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)
        assert call_as(NOBODY, gid, daemon.socket_path, [0, 1, "ping", []]) == "PONG"
        assert call_as(NOBODY, NOBODY, daemon.socket_path, [0, 1, "ping", []]) == "EACCES"


def test_unknown_socket_group_is_refused_at_start(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--socket-group", "no-such-group-here"])
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert "no-such-group-here" in daemon.log() and not os.path.exists(daemon.socket_path)


def test_socket_and_directory_modes_do_not_depend_on_the_umask(redis_server: RedisServer,
                                                               tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    daemon.socket_path = os.path.join(daemon.dir, "run", "s.sock")
    old = os.umask(0)  # inherited by the daemon: the most permissive a careless unit could set
    try:
        daemon.start()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(daemon.socket_path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket_path)).st_mode) == 0o755


def test_a_regular_file_at_the_socket_path_is_left_alone(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    Path(daemon.socket_path).write_text("precious")
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert Path(daemon.socket_path).read_text() == "precious"
    assert "not a socket" in daemon.log()


def test_a_symlink_to_a_live_file_is_neither_followed_nor_replaced(redis_server: RedisServer) -> None:
    # The planted link points at a file the attacker wants clobbered (or chmod-ed): it must stay as is.
    daemon = Daemon(redis_server.url)
    victim = Path(short_tmpdir("sfv-"), "victim")
    victim.write_text("keep")
    victim.chmod(0o600)
    os.symlink(victim, daemon.socket_path)
    try:
        daemon.start(wait=False)
        assert daemon.wait(15) == EXIT_CONFIG
        assert os.path.islink(daemon.socket_path)
        assert victim.read_text() == "keep" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    finally:
        daemon.cleanup()
        victim.unlink()
        victim.parent.rmdir()


@as_root
def test_a_socket_directory_owned_by_another_user_is_refused(redis_server: RedisServer,
                                                             tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    os.chown(daemon.dir, NOBODY, NOBODY)  # its owner could swap our socket for theirs
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert "owned by uid 65534" in daemon.log() and not os.path.exists(daemon.socket_path)


def test_a_group_writable_directory_without_sticky_bit_is_refused(redis_server: RedisServer,
                                                                  tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url)
    os.chmod(daemon.dir, 0o770)
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG
    assert "writable by group or others" in daemon.log()


# --- peers checked by SO_PEERCRED ------------------------------------------------------------------


@as_root
def test_allow_gid_admits_that_group_and_refuses_and_logs_others(redis_server: RedisServer) -> None:
    gid = shared_gid()
    args = ["--allow-gid", str(gid), "--socket-mode", "0666"]
    client = redis_server.client()
    client.flushall()
    with running(reachable_by_others(Daemon(redis_server.url, args=args))) as daemon:
        write = [0, 1, "set_linked_pod", [NS, "mallory", SVC, 7, -1]]
        assert call_as(NOBODY, NOBODY, daemon.socket_path, write) == "closed"
        assert client.get(f"sf:{{{NS}:lk:mallory}}{SVC}") is None  # nothing it sent was executed
        assert f"connection refused: peer uid={NOBODY} gid={NOBODY}" in daemon.log()
        assert call_as(NOBODY, gid, daemon.socket_path, [0, 1, "ping", []]) == "PONG"
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")  # the daemon's own user


@as_root
def test_allow_uid_and_allow_gid_together_admit_either(redis_server: RedisServer) -> None:
    gid = shared_gid()
    args = ["--allow-uid", str(NOBODY), "--allow-gid", str(gid), "--socket-mode", "0666"]
    with running(reachable_by_others(Daemon(redis_server.url, args=args))) as daemon:
        assert call_as(NOBODY, NOBODY, daemon.socket_path, [0, 1, "ping", []]) == "PONG"  # by uid
        assert call_as(1, gid, daemon.socket_path, [0, 1, "ping", []]) == "PONG"  # another uid, by gid
        assert call_as(1, 1, daemon.socket_path, [0, 1, "ping", []]) == "closed"


# --- the Redis password ------------------------------------------------------------------------------

PASSWORD = "s3cr3t-Pa55word-7f1e"  # distinctive: grep for it


class AuthRedis(RedisServer):
    """redis-server with requirepass and an ACL user; the fixture's own client authenticates."""

    def __init__(self) -> None:
        super().__init__(extra_args=[
            "--requirepass", PASSWORD,
            # The least the daemon needs, as docs/OPERATIONS.md (Security) recommends.
            "--user", "app", "on", f">{PASSWORD}-app", "~sf:*", "-@all", "+@read", "+@write", "+@scripting",
            "+@connection", "+time",
        ])

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path, password=PASSWORD, decode_responses=True,
                           socket_timeout=5)


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[AuthRedis]:
    with running(AuthRedis()) as server:
        yield server


def assert_password_nowhere(daemon: Daemon, password: str) -> None:
    assert password not in daemon.log()
    if daemon.proc is not None and daemon.proc.poll() is None:
        cmdline = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert password not in ps


def serves(daemon: Daemon, server: RedisServer) -> None:
    server.client().flushall()
    assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "alice", SVC, 3, -1]) == (None, None)
    assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC]) == (None, 3)
    assert server.client().get(f"sf:{{{NS}:lk:alice}}{SVC}") == "3"


def test_password_from_the_environment(auth_redis: AuthRedis) -> None:
    daemon = Daemon(auth_redis.url, args=["--log-level", "debug"], env={"STATEFULD_REDIS_PASSWORD": PASSWORD})
    with running(daemon):
        serves(daemon, auth_redis)
        error, health = rpc_call(daemon.socket_path, "health", [])
        assert error is None and health["ready"] is True and PASSWORD not in repr(health)
        assert_password_nowhere(daemon, PASSWORD)


def test_password_file_and_acl_user(auth_redis: AuthRedis) -> None:
    daemon = Daemon(auth_redis.url)
    secret = Path(daemon.dir, "redis-password")
    secret.write_text(PASSWORD + "-app\n")  # a trailing newline, as editors leave it
    secret.chmod(0o600)
    daemon.args = ["--redis-username", "app", "--redis-password-file", str(secret), "--log-level", "debug"]
    with running(daemon):
        serves(daemon, auth_redis)
        assert_password_nowhere(daemon, PASSWORD)
        assert any(c["user"] == "app" for c in auth_redis.client().client_list())  # the daemon's connection
        # Every method works with the restricted ACL (the scripts' commands are checked too).
        calls = [
            ("set_service_state", [NS, SVC, 1, "Ready"]), ("report_pod_load", [NS, SVC, 1, 3]),
            ("compute_linked_pod", [NS, "carol", SVC, -1]), ("try_set_linked_pod", [NS, "alice", SVC, 2, -1]),
            ("set_linked_pod_if_absent", [NS, "bob", SVC, 2, 30]), ("remove_linked_pod", [NS, "alice", SVC, 30]),
            ("remove_linked_pod_with_id", [NS, "bob", SVC, -1, 2]), ("get_link_service", [NS, "carol"]),
            ("get_linked_pod_if_persist", [NS, "carol", SVC]), ("batch_get_linked_pod", [NS, ["carol"], SVC]),
            ("set_workload_state", [NS, SVC, "up"]), ("get_workload_state_batch", [NS, [SVC]]),
            ("get_service_state", [NS, SVC]), ("health", []),
        ]
        for method, params in calls:
            error, _ = rpc_call(daemon.socket_path, method, params)
            assert error is None, (method, error)


@pytest.mark.parametrize("setup", ["wrong password", "wrong user"])
def test_refused_credentials_fail_start_up_clearly_without_the_password(auth_redis: AuthRedis, setup: str,
                                                                        tmp_daemon: DaemonFactory) -> None:
    wrong = "Wr0ng-" + PASSWORD
    args = ["--startup-timeout-s", "0.5", "--log-level", "debug"]
    env = {"STATEFULD_REDIS_PASSWORD": wrong if setup == "wrong password" else PASSWORD}
    if setup == "wrong user":
        args += ["--redis-username", "nosuchuser"]
    daemon = tmp_daemon(auth_redis.url, args=args, env=env)
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_REDIS_UNAVAILABLE
    log = daemon.log()
    assert "cannot start" in log and "WRONGPASS" in log  # says what is wrong...
    assert wrong not in log and PASSWORD not in log  # ...without saying the secret
    assert not os.path.exists(daemon.socket_path)


def test_password_in_the_url_is_masked_in_the_log(auth_redis: AuthRedis) -> None:
    # An operator may still put it in STATEFULD_REDIS_URL (environment, not argv): logs mask it.
    url = f"unix://:{PASSWORD}@{auth_redis.socket_path}"
    daemon = Daemon(None, env={"STATEFULD_REDIS_URL": url})
    with running(daemon):
        serves(daemon, auth_redis)
        assert_password_nowhere(daemon, PASSWORD)
        assert "***" in daemon.log()


# --- what the log holds ----------------------------------------------------------------------------


def test_user_ids_and_states_are_not_logged_at_info_level(redis_server: RedisServer) -> None:
    uid, state, service = "uid-Zq9xK2-user", "state-Wv8yJ3-ready", "svc-Kp4mN7"
    with running(Daemon(redis_server.url, args=["--log-level", "info"])) as daemon:
        path = daemon.socket_path
        calls = [
            ("set_service_state", [NS, service, 1, state]),
            ("set_workload_state", [NS, service, state]),
            ("set_linked_pod", [NS, uid, service, 1, -1]),
            ("try_set_linked_pod", [NS, uid, service, 2, -1]),
            ("get_linked_pod", [NS, uid, service]),
            ("batch_get_linked_pod", [NS, [uid, uid + "2"], service]),
            ("remove_linked_pod", [NS, uid, service, 30]),
            ("compute_linked_pod", [NS, uid, service, -1]),
            ("set_linked_pod", [NS, uid + "{", service, 1, -1]),  # INVALID_ARGUMENT
            ("set_service_state", [NS, service, "x", state]),  # INVALID_ARGUMENT
        ]
        for method, params in calls:
            rpc_call(path, method, params)
        # Failures the daemon logs: notifications that fail, a Redis error (INTERNAL), a malformed message.
        redis_server.client().set(f"sf:{{{NS}:lk:{uid}}}", "not a hash")
        rpc_call(path, "get_link_service", [NS, uid])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(msgpack.packb([2, "set_linked_pod", [NS, uid, service, "x", -1]])
                      + msgpack.packb([2, "set_service_state", [NS, service, 1, state * 1000]])
                      + msgpack.packb([7, uid, state]))
            with contextlib.suppress(OSError):
                s.recv(100)
        assert rpc_call(path, "ping", []) == (None, "PONG")
        log = daemon.log()
    assert "notification" in log and "closing connection" in log  # the failures were logged...
    for secret in (uid, state):
        assert secret not in log, f"{secret} appears in the daemon's log:\n{log}"  # ...without user data
