"""The daemon's configuration: one frozen dataclass.

Every field that is an option carries its click settings in ``metadata``; cli.py turns
the fields into ``statefuld serve`` options (``--field-name``, env ``STATEFULD_FIELD_NAME``),
so the parameter list is written once, here. tests/test_config.py checks the two agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from statefuld_client import default_socket_path
from statefuld_client._paths import SOCKET_ENVS

ENV_PREFIX = "STATEFULD_"
# The Redis password is read from the environment (or a file), never from argv.
PASSWORD_ENV = "STATEFULD_REDIS_PASSWORD"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
REDIS_MODES = ("auto", "standalone", "cluster", "sentinel")


def _option(default: Any, help: str, **click_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, "click": click_kwargs})


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/statefuld"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "statefuld")


@dataclass(frozen=True)
class Config:
    socket_path: str = field(
        default_factory=default_socket_path,
        metadata={
            "help": "Unix socket to serve on (default: /run/statefuld/statefuld.sock for root or when "
                    "/run/statefuld exists, else $XDG_RUNTIME_DIR/statefuld/statefuld.sock, else "
                    "/tmp/statefuld-<uid>/statefuld.sock).",
            "click": {},
            # The variables that name the socket for the daemon and the client alike, first found
            # wins: STATEFULD_SOCKET, and STATEFULD_SOCKET_PATH as every other --x-y reads STATEFULD_X_Y.
            "envvar": list(SOCKET_ENVS),
        },
    )
    socket_mode: int = _option(0o660, "File mode of the socket, octal.", type="octal")
    socket_group: str | None = _option(None, "Group that owns the socket (name or gid).")
    redis_url: str | None = _option(
        None,
        "redis://, rediss://, unix:// or redis+sentinel:// URL. Unset: start an embedded private Redis.",
    )
    redis_mode: str = _option("auto", "How to treat the Redis URL.", type=REDIS_MODES)
    redis_username: str | None = _option(None, "ACL user name for Redis.")
    redis_password_file: str | None = _option(
        None, f"File holding the Redis password (or set {PASSWORD_ENV}; never pass it in argv)."
    )
    redis_tls_ca_file: str | None = _option(None, "CA bundle to verify the Redis server (rediss://).")
    redis_tls_cert_file: str | None = _option(None, "Client certificate for Redis TLS.")
    redis_tls_key_file: str | None = _option(None, "Client private key for Redis TLS.")
    key_prefix: str = _option("sf", "Prefix of every Redis key (shared with the Go/Java executors).")
    data_dir: str = field(
        default_factory=_default_data_dir,
        metadata={"help": "Data directory of the embedded Redis (AOF).", "click": {}},
    )
    request_timeout_ms: int = _option(2000, "Deadline of one request, from arrival to reply.", min=1)
    startup_timeout_s: float = _option(10.0, "How long start-up waits for Redis before giving up.", min=0.0)
    max_message_bytes: int = _option(1024 * 1024, "Largest message accepted; larger closes the connection.", min=64)
    max_list_items: int = _option(10_000, "Most items in one list parameter.", min=1)
    max_connections: int = _option(2048, "Client connections open at once; past it a new one is closed at once.", min=1)
    max_buffered_bytes: int = _option(
        64 * 1024 * 1024, "Bytes of incomplete messages held across all connections; past it the connection "
        "that adds more is closed.", min=64
    )
    max_in_flight: int = _option(4096, "Requests in progress daemon-wide before OVERLOADED.", min=1)
    max_in_flight_per_connection: int = _option(
        1024, "Requests in progress on one connection before the daemon stops reading it (it waits, no error).", min=1
    )
    busy_poll_us: int = _option(
        0, "After sending to Redis with few calls waiting, poll for the reply this long instead of sleeping "
        "(lower latency for lone callers, paid in CPU; 0: off).", min=0, max=1000
    )
    drain_timeout_s: float = _option(10.0, "On SIGTERM, how long requests in flight may finish.", min=0.0)
    log_level: str = _option("info", "Log level.", type=LOG_LEVELS)
    log_format: str = _option("text", "Log line format.", type=LOG_FORMATS)
    allow_uid: tuple[int, ...] = _option((), "Only peers with this uid (repeatable; SO_PEERCRED).", multiple=True)
    allow_gid: tuple[int, ...] = _option((), "Only peers with this gid (repeatable; SO_PEERCRED).", multiple=True)
    metrics_addr: str | None = _option(None, "host:port for a Prometheus /metrics listener (off when unset).")
    routable_state: tuple[str, ...] = _option(
        ("Ready",), "Pod state that route_user may place new users on (repeatable).", multiple=True
    )
    load_stale_ms: int = _option(10_000, "A pod load report this old or older is not used for placement.", min=1)
    gone_state: tuple[str, ...] = _option(
        ("Down",), "Pod state that makes a pod gone, its users moved by route_user (repeatable); the first is "
        "written when a pod's last holder disconnects.", multiple=True
    )
    gone_after_ms: int = _option(
        30_000, "A pod whose load report is this old or older is gone; must be above --load-stale-ms.", min=1
    )
    heartbeat_ms: int = _option(
        1000, "How often the load report of a held pod is refreshed; must be below --load-stale-ms.", min=1
    )
    alive_cache_ms: int = _option(
        0, "How long route_user takes a pod it found alive as alive without reading it again (0: read every "
        "time, as the contract says); a pod gone meanwhile keeps its users that much longer.", min=0, max=10_000
    )
    watch_queue_events: int = _option(
        10_000, "Events one watch may have waiting for a connection that does not read; past it they are "
        "dropped and the watch gets a snapshot/gap event.", min=1
    )
    max_watches: int = _option(10_000, "Watches open on this daemon at once (watch_service, watch_links).", min=1)
    max_held_pods: int = _option(1024, "Distinct pods held through this daemon at once (hold_pod).", min=1)

    # Secret: not an option, not in repr. Filled from PASSWORD_ENV or redis_password_file.
    redis_password: str | None = field(default=None, repr=False, metadata={"secret": True})

    def __post_init__(self) -> None:
        if not self.socket_path:
            raise ValueError("socket_path must not be empty")
        if not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"socket_mode {self.socket_mode:04o} is not a file mode")
        if not self.key_prefix or any(c in self.key_prefix for c in "{}"):
            raise ValueError("key_prefix must be non-empty and must not contain '{' or '}'")
        if not self.routable_state:
            raise ValueError("at least one routable_state is needed")
        if not self.gone_state:
            raise ValueError("at least one gone_state is needed")
        both = sorted(set(self.routable_state) & set(self.gone_state))
        if both:
            raise ValueError(f"state {both[0]!r} is both a routable_state and a gone_state")
        if self.gone_after_ms <= self.load_stale_ms:
            raise ValueError(f"gone_after_ms ({self.gone_after_ms}) must be above load_stale_ms "
                             f"({self.load_stale_ms}): a pod too stale for new users is still alive for its own")
        if self.alive_cache_ms >= self.gone_after_ms:
            raise ValueError(f"alive_cache_ms ({self.alive_cache_ms}) must be below gone_after_ms "
                             f"({self.gone_after_ms})")
        if self.heartbeat_ms >= self.load_stale_ms:
            raise ValueError(f"heartbeat_ms ({self.heartbeat_ms}) must be below load_stale_ms "
                             f"({self.load_stale_ms}), or a held pod's report goes stale between heartbeats")

    def with_secrets_from_environment(self) -> Config:
        """Return a copy whose redis_password is read from the environment or the password file."""
        password = os.environ.get(PASSWORD_ENV) or None
        if password is None and self.redis_password_file:
            with open(self.redis_password_file, encoding="utf-8") as f:
                password = f.read().strip() or None
        return dataclasses.replace(self, redis_password=password)


def option_fields() -> list[dataclasses.Field[Any]]:
    """The fields that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(Config) if "click" in f.metadata]


def option_envvars(field: dataclasses.Field[Any]) -> list[str]:
    """The environment variables that set ``field``'s option, in the order they are read."""
    envvar = field.metadata.get("envvar", ENV_PREFIX + field.name.upper())
    return list(envvar) if isinstance(envvar, list) else [envvar]


def known_envvars() -> list[str]:
    """Every STATEFULD_* variable the daemon reads."""
    return sorted({PASSWORD_ENV, *(name for f in option_fields() for name in option_envvars(f))})


def unknown_envvar(environ: dict[str, str]) -> str | None:
    """The first STATEFULD_* variable in ``environ`` that the daemon does not read, with the known
    one it most likely meant; None if there is none. A misspelt STATEFULD_REDIS_URL must never
    quietly start a private embedded Redis in place of the shared one."""
    known = known_envvars()
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            closest = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
            return f"unknown environment variable {name}; did you mean {closest[0]}?"
    return None
