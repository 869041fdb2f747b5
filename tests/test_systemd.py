"""systemd integration as an operator relies on it.

- statefuld.systemd speaks sd_notify(3) and sd_listen_fds(3) correctly (no systemd needed).
- The unit files pass `systemd-analyze verify`, keep their exposure score, and agree with the
  daemon (exit codes, timeouts, socket path).
- A daemon run with NOTIFY_SOCKET sends READY=1 only once it serves, WATCHDOG=1 at the interval
  and STOPPING=1 on SIGTERM, all from its main pid (NotifyAccess=main).
- A daemon handed a listening socket (LISTEN_FDS/LISTEN_PID) serves on it, including the
  connections that queued before it started, and leaves the socket file to its owner.
- The daemon runs under the parts of the unit's sandbox that can be reproduced without systemd:
  UMask=0077, MemoryDenyWriteExecute= (the kernel's PR_SET_MDWE), ProtectProc=invisible with
  ProcSubset=pid (a private /proc mounted so), the last one with its embedded Redis.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from support import REPO, Daemon, DaemonFactory, RedisServer, rpc_call, short_tmpdir, wait_for

from statefuld import errors, systemd
from statefuld.config import Config
from statefuld.embedded import _STOP_TIMEOUT_S as EMBEDDED_STOP_TIMEOUT_S
from statefuld.server import STOP_AFTER_DRAIN_S
from statefuld_client import default_socket_path

UNITS = REPO / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install systemd; .ci/run does)"
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd allows a key many times), line continuations joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def environment(service: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in service["Service"].get("Environment", []):
        for item in assignment.split():
            name, _, value = item.partition("=")
            env[name] = value
    return env


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert match, f"unsupported time span {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1.0, "min": 60.0}[unit]


@pytest.fixture(scope="module")
def units_for_verify() -> Iterator[Path]:
    """Copies of the units whose ExecStart names this environment's statefuld (verify needs it to exist)."""
    statefuld_bin = Path(sys.executable).with_name("statefuld")
    assert statefuld_bin.exists(), statefuld_bin
    directory = Path(short_tmpdir("sfu-"))
    try:
        text = (UNITS / "statefuld.service").read_text()
        text, count = re.subn(r"(?m)^ExecStart=\S+", f"ExecStart={statefuld_bin}", text)
        assert count == 1
        (directory / "statefuld.service").write_text(text)
        shutil.copy(UNITS / "statefuld.socket", directory / "statefuld.socket")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- sd_notify / sd_listen_fds / watchdog, in process ----------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = short_tmpdir("sfn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1") is True
    sock.settimeout(2)
    assert sock.recv(4096) == b"READY=1"


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"statefuld-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1") is True
        sock.settimeout(2)
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_outside_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert systemd.notify("READY=1") is False  # never raises: a lost notification must not kill the daemon


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    assert systemd.watchdog_interval_s() == pytest.approx(0.1)  # half of WatchdogSec, as sd_watchdog_enabled(3)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == pytest.approx(0.1)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None  # armed for another process
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval_s() is None


def test_listen_sockets_for_another_pid_are_ignored_and_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "statefuld.socket")
    assert systemd.listen_sockets() == []
    # Unset either way, so the embedded Redis (a child) never takes them for its own.
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    assert systemd.listen_sockets() == []


_LISTEN_CHILD = r"""
import os, socket, sys
from statefuld import systemd
sockets = systemd.listen_sockets()
print(len(sockets), [s.getsockname() for s in sockets], [s.type == socket.SOCK_STREAM for s in sockets],
      [os.get_inheritable(s.fileno()) for s in sockets], "LISTEN_FDS" in os.environ)
"""


def test_listen_sockets_takes_the_passed_fds() -> None:
    directory = short_tmpdir("sfl-")
    try:
        paths = [os.path.join(directory, name) for name in ("a.sock", "b.sock")]
        listeners = []
        for path in paths:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen()
            listeners.append(listener)
        out = run_with_listen_fds([sys.executable, "-c", _LISTEN_CHILD], listeners, capture=True)
        assert out.strip() == f"2 {paths!r} [True, True] [False, False] False"
    finally:
        for listener in listeners:
            listener.close()
        shutil.rmtree(directory, ignore_errors=True)


# How systemd starts an activated service: the sockets at fds 3.., LISTEN_FDS, and LISTEN_PID set to
# the pid of the process that will read them (exec keeps the pid).
_ACTIVATE = r"""
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=":".join(["statefuld.socket"] * len(fds)))
os.execv(sys.argv[2], sys.argv[2:])
"""


def activation_command(command: list[str], listeners: list[socket.socket]) -> list[str]:
    fds = ",".join(str(listener.fileno()) for listener in listeners)
    return [sys.executable, "-c", _ACTIVATE, fds, *command]


def run_with_listen_fds(command: list[str], listeners: list[socket.socket], *, capture: bool) -> str:
    result = subprocess.run(
        activation_command(command, listeners), pass_fds=[listener.fileno() for listener in listeners],
        capture_output=capture, text=True, timeout=20, check=True,
    )
    return result.stdout


# --- the unit files ----------------------------------------------------------------------------


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(units_for_verify: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no",
         str(units_for_verify / "statefuld.service"), str(units_for_verify / "statefuld.socket")],
        capture_output=True, text=True, timeout=30,
    )
    # verify exits 0 on unknown keys too; it only says so. Any line naming our units is a finding.
    findings = [line for line in (result.stdout + result.stderr).splitlines() if "statefuld" in line]
    assert result.returncode == 0 and not findings, result.stdout + result.stderr


@needs_systemd_analyze
def test_service_exposure_score_stays_low(units_for_verify: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(units_for_verify / "statefuld.service")],
        capture_output=True, text=True, timeout=30,
    )
    match = re.search(r"Overall exposure level for statefuld\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 1.2 when written (docs/DEPLOYMENT.md); what is left is network access (Redis) and host users.
    assert float(match.group(1)) <= 1.5, result.stdout


def test_service_agrees_with_the_daemon() -> None:
    service = parse_unit(UNITS / "statefuld.service")
    svc = service["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert seconds(svc["WatchdogSec"][0]) > 0
    assert svc["Restart"] == ["on-failure"]
    prevented = {int(code) for code in svc["RestartPreventExitStatus"][0].split()}
    # Start-up failures a restart cannot fix; 69 (Redis unreachable) is restarted on purpose.
    assert prevented == {errors.EXIT_USAGE, errors.EXIT_SOCKET_IN_USE, errors.EXIT_CONFIG}
    assert errors.EXIT_REDIS_UNAVAILABLE not in prevented
    defaults = Config(socket_path="/unused")
    # Not SIGKILLed while still stopping cleanly: the drain, what follows it, an embedded Redis's exit.
    assert seconds(svc["TimeoutStopSec"][0]) > defaults.drain_timeout_s + STOP_AFTER_DRAIN_S + EMBEDDED_STOP_TIMEOUT_S
    assert seconds(svc["TimeoutStartSec"][0]) > defaults.startup_timeout_s
    assert svc["KillMode"] == ["mixed"]  # SIGTERM to the daemon only; it stops its embedded Redis itself
    assert svc["RuntimeDirectory"] == ["statefuld"] and svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert svc["User"] == ["statefuld"]
    # No secret on the command line; the password comes from a credential or the environment file.
    assert "password" not in svc["ExecStart"][0].lower()
    assert svc["ExecStart"][0].split()[1:] == ["serve"]

    env = environment(service)
    serve_envvars = {"STATEFULD_SOCKET"} | {
        "STATEFULD_" + f.name.upper() for f in dataclasses.fields(Config) if "click" in f.metadata
    }
    assert set(env) <= serve_envvars, set(env) - serve_envvars

    socket_unit = parse_unit(UNITS / "statefuld.socket")["Socket"]
    # The socket systemd holds is the one the daemon binds when not activated, and the one clients find.
    assert socket_unit["ListenStream"] == [env["STATEFULD_SOCKET"]]
    assert os.path.dirname(env["STATEFULD_SOCKET"]) == "/run/" + svc["RuntimeDirectory"][0]
    assert env["STATEFULD_SOCKET"] == "/run/statefuld/statefuld.sock"
    assert int(socket_unit["SocketMode"][0], 8) == Config(socket_path="/unused").socket_mode
    assert socket_unit["SocketGroup"] == svc["Group"]


def test_the_socket_is_reachable_by_its_group_before_the_service_first_runs() -> None:
    # systemd creates the socket's directory root:root with DirectoryMode= (SocketUser=/SocketGroup=
    # chown the socket file only), and only the service's RuntimeDirectory= makes it statefuld's.
    # Until then the statefuld group's members are "others" there, so they need o+x; the 0660
    # socket, not the directory, keeps everyone else out.
    socket_unit = parse_unit(UNITS / "statefuld.socket")["Socket"]
    directory_mode = int(socket_unit["DirectoryMode"][0], 8)
    assert directory_mode & stat.S_IXOTH, f"DirectoryMode={directory_mode:04o}: the group gets EACCES"
    assert not directory_mode & (stat.S_IWGRP | stat.S_IWOTH)  # the daemon refuses such a directory (78)
    socket_mode = int(socket_unit["SocketMode"][0], 8)
    assert socket_mode & stat.S_IRWXO == 0 and socket_mode & stat.S_IRWXG == stat.S_IRGRP | stat.S_IWGRP


def restart_prevented() -> set[int]:
    svc = parse_unit(UNITS / "statefuld.service")["Service"]
    return {int(code) for value in svc["RestartPreventExitStatus"] for code in value.split()}


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {"STATEFULD_LOG_LEVEL": "verbose"}, "'verbose' is not one of"),
    (["--max-in-flight", "0"], {}, "Invalid value for '--max-in-flight'"),
    (["--no-such-option"], {}, "No such option"),
])
def test_a_bad_option_or_variable_fails_the_unit_instead_of_restarting_it(
        args: list[str], env: dict[str, str], message: str) -> None:
    # click's own usage code (2) is not in RestartPreventExitStatus=: systemd would restart the
    # service every RestartSec= forever over a typo in /etc/statefuld/statefuld.env.
    directory = short_tmpdir("sfx-")
    socket_path = os.path.join(directory, "statefuld.sock")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("STATEFULD_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "statefuld", "serve", "--socket-path", socket_path,
             "--redis-url", f"unix://{directory}/no-redis.sock", *args],
            env={**clean_env, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        assert done.returncode in restart_prevented(), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr  # click's message, kept
        assert not os.path.exists(socket_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_sysusers_creates_the_service_user() -> None:
    lines = [line.split() for line in (UNITS / "statefuld.sysusers").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and lines[0][:2] == ["u", "statefuld"]


# --- a real daemon under sd_notify, watchdog and socket activation -----------------------------


def receive(sock: socket.socket, timeout_s: float) -> tuple[list[str], int] | None:
    """One notification: its lines and the sender's pid (SCM_CREDENTIALS), or None on timeout."""
    sock.settimeout(timeout_s)
    try:
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    except TimeoutError:
        return None
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
    return data.decode().splitlines(), pid


@pytest.fixture(scope="module")
def redis_for_systemd() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def test_ready_watchdog_and_stopping(redis_for_systemd: RedisServer, notify_socket: tuple[socket.socket, str],
                                     tmp_daemon: DaemonFactory) -> None:
    sock, path = notify_socket
    daemon = tmp_daemon(redis_for_systemd.url, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    daemon.start(wait=False)
    assert daemon.proc is not None
    deadline = time.monotonic() + 15
    ready = None
    while ready is None:
        assert time.monotonic() < deadline, f"no READY=1 within 15 s:\n{daemon.log()}"
        message = receive(sock, 0.5)
        if message is not None and "READY=1" in message[0]:
            ready = message
        assert daemon.proc.poll() is None, daemon.log()
    # READY=1 means "serving": the very next connection is answered and Redis is usable.
    assert rpc_call(daemon.socket_path, "ping", [], timeout_s=2) == (None, "PONG")
    error, health = rpc_call(daemon.socket_path, "health", [], timeout_s=2)
    assert error is None and health["ready"] is True
    assert ready[1] == daemon.proc.pid  # NotifyAccess=main would drop it from any other process

    # WatchdogSec=200ms: a WATCHDOG=1 at least every 100 ms or so, from the main pid.
    watchdog_times = []
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        message = receive(sock, 0.5)
        if message is not None and "WATCHDOG=1" in message[0]:
            assert message[1] == daemon.proc.pid
            watchdog_times.append(time.monotonic())
    assert len(watchdog_times) >= 5, watchdog_times
    gaps = [b - a for a, b in itertools.pairwise(watchdog_times)]
    assert max(gaps) < 0.2, gaps  # never as late as the watchdog timeout itself

    daemon.signal(signal.SIGTERM)
    stopping = None
    while stopping is None:
        message = receive(sock, 5)
        assert message is not None, f"no STOPPING=1 after SIGTERM:\n{daemon.log()}"
        if "STOPPING=1" in message[0]:
            stopping = message
    assert stopping[1] == daemon.proc.pid
    assert daemon.wait(15) == 0


def test_socket_activation(redis_for_systemd: RedisServer) -> None:
    directory = short_tmpdir("sfa-")
    path = os.path.join(directory, "statefuld.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o660)  # as SocketMode=0660 makes it
    listener.listen(16)
    before = os.stat(path)
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A client that connects while no daemon runs waits in the backlog (what socket activation is for).
        early.connect(path)
        early.sendall(msgpack.packb([0, 7, "ping", []]))

        for round_ in range(2):  # a restart takes over the same socket and the connections queued meanwhile
            daemon = Daemon(redis_for_systemd.url, dir=directory)
            log = open(daemon.log_path, "ab")  # handed to the child, closed below
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("STATEFULD_SOCKET", None)
            daemon.proc = subprocess.Popen(
                activation_command(daemon.command(), [listener]), pass_fds=[listener.fileno()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            )
            log.close()
            try:
                wait_for(daemon._ready, timeout_s=15, what="the socket-activated daemon")
                if round_ == 0:
                    early.settimeout(5)
                    reply = msgpack.unpackb(early.recv(4096))
                    assert reply == [1, 7, None, "PONG"]
                # Served on the inherited socket: the same file, not a new bind over it.
                now = os.stat(path)
                assert (now.st_ino, stat.S_IMODE(now.st_mode)) == (before.st_ino, 0o660)
                daemon.signal(signal.SIGTERM)
                assert daemon.wait(15) == 0, daemon.log()
                # The socket belongs to statefuld.socket: the daemon must leave it in place.
                assert os.path.exists(path) and os.stat(path).st_ino == before.st_ino, daemon.log()
            finally:
                daemon.stop()
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.connect(path)  # still accepted into the backlog between two daemons
            late.close()
    finally:
        early.close()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


_SANDBOX = r"""
import ctypes, os, sys
os.umask(0o077)                                    # UMask=0077
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:                # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(99)
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_supported() -> bool:
    # PR_GET_MDWE (66) exists from Linux 6.3 on; before that prctl fails with EINVAL.
    return bool(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) >= 0)


@pytest.mark.skipif(not mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_daemon_runs_with_umask_0077_and_no_write_execute_memory(redis_for_systemd: RedisServer,
                                                                 tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_for_systemd.url)
    daemon.command = lambda: [sys.executable, "-c", _SANDBOX, *Daemon.command(daemon)]  # type: ignore[method-assign]
    daemon.start()
    assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")
    # The configured socket mode, not what UMask=0077 would leave: group members can connect.
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == Config(socket_path="/unused").socket_mode
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    assert re.search(r"(?m)^Umask:\s+0077$", status), status
    assert daemon.stop() == 0, daemon.log()


_PROC_SUBSET = 'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$@"'


def unshare_works() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    probe = subprocess.run([unshare, "--mount", "--pid", "--fork", "sh", "-c", _PROC_SUBSET, "sh", "true"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs root and unshare(1) to mount a private /proc")
def test_daemon_and_embedded_redis_run_with_proc_subset_pid(tmp_daemon: DaemonFactory) -> None:
    # ProtectProc=invisible and ProcSubset=pid: a /proc with only process directories, others' hidden.
    directory = short_tmpdir("sfp-")
    daemon = tmp_daemon(None, dir=directory, args=["--data-dir", os.path.join(directory, "data")])
    inner = Daemon.command(daemon)
    daemon.command = lambda: [  # type: ignore[method-assign]
        "unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", _PROC_SUBSET, "sh", *inner]
    daemon.start()
    assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")
    assert daemon.proc is not None
    (main_pid,) = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split()
    os.kill(int(main_pid), signal.SIGTERM)
    assert daemon.wait(20) == 0, daemon.log()


def test_default_socket_is_the_units_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client on the host finds the systemd-managed daemon without configuration.
    monkeypatch.delenv("STATEFULD_SOCKET", raising=False)
    if os.geteuid() != 0 and not os.path.isdir("/run/statefuld"):
        pytest.skip("the system default applies to root or when /run/statefuld exists")
    listen = parse_unit(UNITS / "statefuld.socket")["Socket"]["ListenStream"][0]
    assert default_socket_path() == listen

