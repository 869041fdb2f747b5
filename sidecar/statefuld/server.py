"""The daemon's lifecycle: start in an order that cannot leave it half ready, stop in reverse.

Start: check the socket path (before anything else, so a second daemon fails fast and never
starts a Redis on a data directory in use) -> check the Redis TLS files -> embedded Redis (when there is no --redis-url)
-> Executor.connect (Redis answers, scripts loaded) -> bind the socket -> READY=1.
Stop (SIGTERM/SIGINT): STOPPING=1 -> close the listener -> stop reading -> drain requests in
flight up to drain_timeout_s -> cancel the rest -> close the connections -> close Redis ->
stop the embedded Redis -> remove the socket file. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import grp
import logging
import os
import shlex
import shutil
import signal
import socket
import ssl
import stat
import sys
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import uvloop

from statefuld import __version__, systemd
from statefuld.calls import DRAIN_CANCEL_S, Calls
from statefuld.config import Config
from statefuld.embedded import EmbeddedError, EmbeddedRedis
from statefuld.errors import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_REDIS_UNAVAILABLE,
    EXIT_SOCKET_IN_USE,
    Unavailable,
)
from statefuld.metrics import MetricsListener, Observer, RedisWatch, RequestMetrics, parse_addr
from statefuld.protocol import Connections
from statefuld.redis_mux import CLOSE_TIMEOUT_S as REDIS_CLOSE_TIMEOUT_S
from statefuld.rpc import METHODS

log = logging.getLogger("statefuld.server")

_T = TypeVar("_T")
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
_BACKLOG = 1024
_CLOSE_TIMEOUT_S = 2.0  # after the drain: how long replies may take to leave before connections are cut
# The longest a stop can take beyond drain_timeout_s: cancelled requests' Tasks ending, replies
# leaving, the Redis connections closing (in parallel), one after the other. Whatever stops the
# daemon (docker stop, terminationGracePeriodSeconds, TimeoutStopSec=) must wait longer than
# drain_timeout_s + this, or it kills a daemon that is still stopping cleanly; the deployment
# tests check each recipe against it.
STOP_AFTER_DRAIN_S: float = DRAIN_CANCEL_S + _CLOSE_TIMEOUT_S + REDIS_CLOSE_TIMEOUT_S
# SIGHUP: the terminal the daemon runs in closed; a clean stop, not a death that leaves the socket.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_TLS_SCHEMES = ("rediss://", "rediss+sentinel://")


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code (errors.EXIT_*)."""
    result: int = uvloop.run(Server(config).serve())
    return result


def redact_url(url: str) -> str:
    """The URL with its password (in the authority or a `password=` query parameter) masked, for logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    if "password" in parts.query.lower():
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        masked = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        url = url.replace("?" + parts.query, "?" + masked, 1)
    return url


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop_requested: asyncio.Event | None = None
        self._signal_count = 0
        self._embedded: EmbeddedRedis | None = None
        self._executor: Any = None
        self._dispatcher: Any = None
        self._calls: Calls | None = None
        self._holds: Any = None
        self._connections: Connections | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._redis_watch: RedisWatch | None = None
        self._redis_watch_task: asyncio.Task[None] | None = None
        self._metrics_listener: MetricsListener | None = None
        # (path, st_dev, st_ino) of the socket file we bound: removed at exit only if still ours.
        self._bound: tuple[str, int, int] | None = None

    # --- the whole life ----------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("statefuld %s starting (pid %d)", __version__, os.getpid(), extra={"event": "starting"})
        code = EXIT_INTERNAL
        try:
            code = await self._serve()
        except StartupError as exc:
            log.error("statefuld cannot start: %s", exc, extra={"event": "startup_failed"})
            code = exc.exit_code
        except Exception:
            log.exception("statefuld failed")
        finally:
            await self._release()
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
            log.info("statefuld stopped (exit code %d)", code, extra={"event": "stopped"})
        return code

    async def _serve(self) -> int:
        config = self.config
        activated = systemd.listen_sockets()
        listen_sock: socket.socket | None = None
        path = ""
        gid: int | None = None
        if activated:
            if len(activated) > 1:
                log.warning("systemd passed %d sockets; serving on the first only", len(activated))
            listen_sock = activated[0]
        else:
            path = os.path.abspath(config.socket_path)
            gid = _resolve_group(config.socket_group)
            _check_socket_path(path)
        if config.metrics_addr is not None:
            try:
                parse_addr(config.metrics_addr)
            except ValueError as exc:
                raise StartupError(str(exc), EXIT_CONFIG) from exc

        _check_redis_tls(config)

        if not await self._until_stop_requested(self._connect_redis()):
            log.info("stop requested during start-up")
            return EXIT_OK

        calls, connections = self._calls, self._connections
        assert calls is not None and connections is not None and self._redis_watch is not None
        observer = Observer(calls, connections, self._executor, self._redis_watch, self._holds,
                            self._dispatcher.watches)
        self._dispatcher.stats = observer.snapshot
        if config.metrics_addr is not None:
            self._start_metrics(observer, config.metrics_addr)
        if listen_sock is None:
            listen_sock = self._bind(path, config.socket_mode, gid)
        self._listener = await asyncio.get_running_loop().create_unix_server(
            connections.factory, sock=listen_sock, backlog=_BACKLOG
        )
        name = listen_sock.getsockname()  # bytes for an abstract-namespace socket from systemd
        where = (name if isinstance(name, str) else repr(name)) or "(unnamed socket)"
        self._announce(where, activated=bool(activated))
        systemd.notify("READY=1")
        interval_s = systemd.watchdog_interval_s()
        if interval_s is not None:
            self._watchdog = asyncio.create_task(_watchdog(interval_s))
        self._redis_watch_task = asyncio.create_task(self._redis_watch.run())
        self._trimmer = asyncio.create_task(_return_freed_memory(connections))

        assert self._stop_requested is not None
        await self._stop_requested.wait()
        await self._shutdown()
        return EXIT_OK

    async def _until_stop_requested(self, work: Awaitable[_T]) -> bool:
        """Run start-up work; False if a signal came first (the work is then cancelled)."""
        assert self._stop_requested is not None
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self._stop_requested.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
            task.result()  # start-up failures propagate
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    async def _connect_redis(self) -> None:
        from statefuld.executor import Executor
        from statefuld.notifications import check_at_start
        from statefuld.rpc import Dispatcher

        config = self.config
        if config.redis_url is None:
            self._embedded = EmbeddedRedis(config.data_dir, config.startup_timeout_s)
            try:
                await self._embedded.start()
            except EmbeddedError as exc:
                raise StartupError(str(exc), exc.exit_code) from exc
            config = dataclasses.replace(config, redis_url=self._embedded.url)
        assert config.redis_url is not None
        shown_url = redact_url(config.redis_url)
        try:
            self._executor = await Executor.connect(config)
        except Unavailable as exc:
            raise StartupError(
                f"Redis at {shown_url} is unavailable after {config.startup_timeout_s}s: {exc.message}",
                EXIT_REDIS_UNAVAILABLE,
            ) from exc
        except ValueError as exc:
            raise StartupError(f"invalid Redis configuration ({shown_url}): {exc}", EXIT_CONFIG) from exc
        transport = self._executor.describe_transport()
        log.info("connected to Redis at %s%s", shown_url, "" if transport == shown_url else f" ({transport})",
                 extra={"event": "redis_connected"})
        await check_at_start(self._executor.transport)
        dispatcher = Dispatcher(self._executor, config)
        self._holds = dispatcher.holds
        self._calls = calls = Calls(config, dispatcher, RequestMetrics(METHODS))
        self._connections = Connections(config, calls.session)
        self._redis_watch = RedisWatch(self._executor)
        self._dispatcher = dispatcher

    def _start_metrics(self, observer: Observer, addr: str) -> None:
        listener = MetricsListener(observer, addr)
        try:
            listener.start(asyncio.get_running_loop())
        except OSError as exc:
            code = EXIT_SOCKET_IN_USE if exc.errno == errno.EADDRINUSE else EXIT_CONFIG
            raise StartupError(f"cannot serve metrics on {addr}: {exc.strerror or exc}", code) from exc
        self._metrics_listener = listener

    # --- the socket --------------------------------------------------------------------------

    def _bind(self, path: str, mode: int, gid: int | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for attempt in (1, 2):
                # Born 0600 whatever the process umask: nobody else can connect before the chmod.
                old_umask = os.umask(0o177)
                try:
                    sock.bind(path)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or attempt == 2:
                        raise StartupError(f"cannot bind {path}: {exc.strerror}", _bind_exit_code(exc)) from exc
                    # Someone made the file while Redis was starting: check it again (live -> 73).
                    _check_socket_path(path)
                finally:
                    os.umask(old_umask)
            info = os.lstat(path)
            self._bound = (path, info.st_dev, info.st_ino)
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot set up {path}: {exc.strerror}", EXIT_CONFIG) from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _announce(self, where: str, *, activated: bool) -> None:
        how = "systemd-activated socket" if activated else f"socket (mode {self.config.socket_mode:04o})"
        log.info("statefuld ready on %s %s", how, where, extra={"event": "listening"})
        quoted = shlex.quote(where)
        command = _statefuld_command()
        log.info("try it: %s ping --socket-path %s ; %s call --socket-path %s get_linked_pod NS UID SERVICE",
                 command, quoted, command, quoted)

    def _remove_socket_file(self) -> None:
        if self._bound is None:
            return
        path, dev, ino = self._bound
        self._bound = None
        try:
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == (dev, ino):  # not a successor daemon's socket
                os.unlink(path)
        except OSError:
            pass

    # --- stopping ----------------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        self._signal_count += 1
        assert self._stop_requested is not None
        if self._signal_count == 1:
            log.info("received %s: shutting down (send it again to force)", signal.Signals(sig).name)
            self._stop_requested.set()
        else:
            self._force_exit(sig)

    def _force_exit(self, sig: int) -> NoReturn:
        log.warning("received %s again: exiting now, requests in flight are abandoned", signal.Signals(sig).name)
        self._remove_socket_file()
        if self._embedded is not None:
            self._embedded.terminate_now()
        for handler in logging.getLogger().handlers:
            handler.flush()
        # os._exit: whatever the loop is stuck on (a hung drain, a Redis close) must not hold us.
        os._exit(128 + sig)

    async def _shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        calls, connections = self._calls, self._connections
        assert calls is not None and connections is not None and self._listener is not None
        self._listener.close()
        # Before any connection closes: a daemon that stops is no holder lost (no Down written).
        await self._holds.stop()
        connections.stop_reading()
        drain_s = self.config.drain_timeout_s
        log.info("draining: %d connections, %d requests in flight (up to %ss)", len(connections.open),
                 len(calls.in_flight), drain_s, extra={"event": "draining"})
        await calls.drain(drain_s)
        closing = []
        for conn in list(connections.open):
            conn.close()
            if conn.closed is not None:
                closing.append(conn.closed)
        if closing:
            _closed, stuck = await asyncio.wait(closing, timeout=_CLOSE_TIMEOUT_S)
            if stuck:  # peers that do not read: their last replies are dropped
                for conn in list(connections.open):
                    conn.abort()
        log.info("stopped serving: %d requests, %d notifications", calls.requests, calls.notifications)

    async def _release(self) -> None:
        """Everything start-up acquired, in reverse; runs after a clean stop and after a failed start."""
        if self._holds is not None:
            await self._holds.stop()
        if self._dispatcher is not None:
            await self._dispatcher.watches.close()
        for task in (self._watchdog, self._redis_watch_task, self._trimmer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._metrics_listener is not None:
            # In a thread: shutdown() waits up to the HTTP server's poll interval (0.5 s).
            await asyncio.to_thread(self._metrics_listener.close)
            self._metrics_listener = None
        if self._listener is not None:
            self._listener.close()
        if self._executor is not None:
            try:
                await self._executor.close()
            except Exception:
                log.exception("error while closing the Redis connections")
            self._executor = None
        if self._embedded is not None:
            await self._embedded.stop()
            self._embedded = None
        self._remove_socket_file()


# --- helpers ---------------------------------------------------------------------------------


# How often the daemon checks whether connections went since it last gave freed memory back.
_TRIM_INTERVAL_S = 1.0


async def _return_freed_memory(connections: Connections) -> None:
    """After connections go, hand the memory they freed back to the system (glibc's malloc_trim):
    glibc keeps freed pages for reuse, so without it RSS stays at its peak after a burst of
    clients. Once a second at most, and only after a connection closed."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    gone = 0
    while True:
        await asyncio.sleep(_TRIM_INTERVAL_S)
        now_gone = connections.accepted - len(connections.open)
        if now_gone != gone:
            gone = now_gone
            trim(0)


async def _watchdog(interval_s: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def _statefuld_command() -> str:
    """How to run statefuld from here: by name if PATH finds this one, else by its path (a virtual
    environment's statefuld is not on PATH unless the environment is activated)."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) != "statefuld":  # python -m statefuld
        return f"{shlex.quote(sys.executable)} -m statefuld"
    return "statefuld" if shutil.which("statefuld") == script else shlex.quote(script)


def _bind_exit_code(exc: OSError) -> int:
    return EXIT_SOCKET_IN_USE if exc.errno == errno.EADDRINUSE else EXIT_CONFIG


def _resolve_group(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"socket group {group!r} does not exist", EXIT_CONFIG) from None


def _check_redis_tls(config: Config) -> None:
    """Refuse Redis TLS files that cannot be used (EXIT_CONFIG, naming the file), and warn about
    TLS files given for a Redis not reached over TLS: redis-py ignores them without a word."""
    files = {"--redis-tls-ca-file": config.redis_tls_ca_file, "--redis-tls-cert-file": config.redis_tls_cert_file,
             "--redis-tls-key-file": config.redis_tls_key_file}
    given = {option: path for option, path in files.items() if path}
    if not given:
        return
    url = config.redis_url
    if url is None or not url.startswith(_TLS_SCHEMES):
        log.warning("ignoring %s: %s is not reached over TLS (that takes a rediss:// or rediss+sentinel:// URL)",
                    ", ".join(f"{option} {path}" for option, path in given.items()),
                    "the embedded Redis" if url is None else redact_url(url), extra={"event": "tls_files_ignored"})
        return
    for option, path in given.items():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise StartupError(f"cannot read {option} {path}: {exc.strerror}", EXIT_CONFIG) from exc
    _check_tls_usable(config.redis_tls_cert_file, config.redis_tls_key_file, config.redis_tls_ca_file)


def _check_tls_usable(cert: str | None, key: str | None, ca: str | None) -> None:
    if key and not cert:
        raise StartupError("--redis-tls-key-file needs --redis-tls-cert-file (the certificate of that key)",
                           EXIT_CONFIG)
    # Readable is not yet usable. Load them as redis-py will when it first connects, where the
    # same error would escape as a crash (exit 70, a traceback). A passphrase is never asked for:
    # a daemon has no one to ask, so an encrypted key fails here like any unusable one.
    context = ssl.create_default_context()
    if cert:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
        except OSError as exc:
            pair = f"--redis-tls-cert-file {cert}" + (f" with --redis-tls-key-file {key}" if key else "")
            # OpenSSL's bare "PEM lib" says nothing of which of these it was.
            hint = " (not PEM, an encrypted key, or no private key)" if _bare_ssl_error(exc) else ""
            raise StartupError(f"cannot use {pair}: {exc}{hint}", EXIT_CONFIG) from exc
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:
            raise StartupError(f"cannot use --redis-tls-ca-file {ca}: {exc}", EXIT_CONFIG) from exc


def _bare_ssl_error(exc: OSError) -> bool:
    return isinstance(exc, ssl.SSLError) and exc.reason is None


def _check_socket_path(path: str) -> None:
    """Make the socket's directory safe and its path free, or raise StartupError.

    - path longer than sun_path: refused.
    - the directory is created (0755) if missing; an existing one must be owned by us or root,
      and not writable by group/others unless sticky (as /tmp: others cannot rename or remove
      our socket there).
    - a symlink or a non-socket at the path: refused, never followed or deleted.
    - a socket nobody listens on (ECONNREFUSED, a dead daemon's): removed.
    - a socket with a live listener: refused with EXIT_SOCKET_IN_USE.
    """
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise StartupError(f"socket path {path} is longer than {_MAX_UNIX_PATH} bytes", EXIT_CONFIG)
    _check_socket_dir(os.path.dirname(path))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StartupError(f"{path} is a symbolic link; refusing to follow or replace it", EXIT_CONFIG)
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it", EXIT_CONFIG)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # stale: removed below
        except FileNotFoundError:
            return
        except (TimeoutError, BlockingIOError) as exc:  # a listener with a full backlog is alive
            raise StartupError(f"another process is serving on {path} (busy)", EXIT_SOCKET_IN_USE) from exc
        except OSError as exc:
            raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}", EXIT_CONFIG) from exc
        else:
            raise StartupError(
                f"another process (a running statefuld?) is serving on {path}; stop it or choose another "
                "--socket-path", EXIT_SOCKET_IN_USE)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot remove the stale socket {path}: {exc.strerror}", EXIT_CONFIG) from exc
    log.info("removed stale socket %s (nobody was listening on it)", path)


def _check_socket_dir(directory: str) -> None:
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        old_umask = os.umask(0o022)  # makedirs' mode goes through the umask; 0755 whatever it is
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the socket directory {directory}: {exc.strerror}", EXIT_CONFIG) from exc
        finally:
            os.umask(old_umask)
        log.info("created socket directory %s", directory)
        info = os.stat(directory)
    except OSError as exc:
        raise StartupError(f"cannot use the socket directory {directory}: {exc.strerror}", EXIT_CONFIG) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"socket directory {directory} is not a directory", EXIT_CONFIG)
    if info.st_uid not in (os.geteuid(), 0):
        raise StartupError(
            f"socket directory {directory} is owned by uid {info.st_uid}; it must be ours or root's", EXIT_CONFIG)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise StartupError(
            f"socket directory {directory} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}) without the sticky bit: anyone could replace the socket",
            EXIT_CONFIG)
