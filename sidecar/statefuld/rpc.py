"""The method table and argument validation: what each method takes, checked once, before any
Redis work, then handed to the executor.

Every rule is the contract's (docs/PROTOCOL.md, "Arguments"); a rejected call raises
InvalidArgument naming the parameter as the contract names it, and nothing reaches Redis.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from statefuld.config import Config
from statefuld.errors import InvalidArgument, UnknownMethod
from statefuld.executor import Executor
from statefuld.liveness import Holds
from statefuld.watch import Watches, check_watch_id

MAX_INT32 = 2**31 - 1
NAME_MAX_BYTES = 128
UID_MAX_BYTES = 256
STATE_MAX_BYTES = 4096

# ASCII characters refused outright; non-ASCII strings take the slower Unicode path below.
_NAME_BAD_ASCII = re.compile(r"[\x00-\x20\x7f:{}]")
_UID_BAD_ASCII = re.compile(r"[\x00-\x1f\x7f{}]")

# A parameter's check: (its name, the value, the daemon's configuration) -> the value, or raises.
Check = Callable[[str, Any, Config], Any]


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


_SHOWN_INT_CHARS = 24  # any msgpack integer (at most 20 digits and a sign) is shown whole


def _shown(value: Any) -> str:
    # The caller learns which int was out of range; other values only by type, so an error never
    # echoes a caller's string. Cut, so a message stays short whatever a caller hands in.
    if type(value) is int:
        text = str(value)
        return text if len(text) <= _SHOWN_INT_CHARS else text[:_SHOWN_INT_CHARS] + "..."
    return _type_name(value)


def _utf8_size(param: str, value: Any) -> int:
    if type(value) is not str:
        raise InvalidArgument(f"{param} must be a string, got {_type_name(value)}")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: the wire had bytes that are not UTF-8
        raise InvalidArgument(f"{param} is not valid UTF-8") from None


# ns and service values already found valid: a handful of distinct values in practice, so most
# calls check them with one set lookup. Bounded: cleared when full.
_NAMES_CACHED = 1024
_names_ok: set[str] = set()


def check_name(param: str, value: Any, config: Config) -> str:
    """ns and service: 1..128 bytes, no ':' '{' '}', no Unicode whitespace, no control characters."""
    if type(value) is str and value in _names_ok:
        return value
    _check_name(param, value)
    if len(_names_ok) >= _NAMES_CACHED:
        _names_ok.clear()
    _names_ok.add(value)
    return value  # type: ignore[no-any-return]


def _check_name(param: str, value: Any) -> None:
    size = _utf8_size(param, value)
    if not 1 <= size <= NAME_MAX_BYTES:
        raise InvalidArgument(f"{param} must be 1..{NAME_MAX_BYTES} bytes of UTF-8, got {size}")
    if value.isascii():
        if _NAME_BAD_ASCII.search(value):
            raise InvalidArgument(f"{param} must not contain ':', '{{', '}}', whitespace or control characters")
    else:
        for c in value:
            if c in ":{}" or c.isspace() or unicodedata.category(c) == "Cc":
                raise InvalidArgument(
                    f"{param} must not contain ':', '{{', '}}', whitespace or control characters"
                )


def check_uid(param: str, value: Any, config: Config) -> str:
    """uid: 1..256 bytes, no '{' '}' or control characters (spaces and ':' are fine)."""
    # Most uids: ASCII, where printable is exactly "no control character" and a char is a byte.
    if type(value) is str and value.isascii() and value.isprintable() and 0 < len(value) <= UID_MAX_BYTES \
            and "{" not in value and "}" not in value:
        return value
    size = _utf8_size(param, value)
    if not 1 <= size <= UID_MAX_BYTES:
        raise InvalidArgument(f"{param} must be 1..{UID_MAX_BYTES} bytes of UTF-8, got {size}")
    if value.isascii():
        if _UID_BAD_ASCII.search(value):
            raise InvalidArgument(f"{param} must not contain '{{', '}}' or control characters")
    else:
        for c in value:
            if c in "{}" or unicodedata.category(c) == "Cc":
                raise InvalidArgument(f"{param} must not contain '{{', '}}' or control characters")
    return value  # type: ignore[no-any-return]


def check_state(param: str, value: Any, config: Config) -> str:
    size = _utf8_size(param, value)
    if not 1 <= size <= STATE_MAX_BYTES:
        raise InvalidArgument(f"{param} must be 1..{STATE_MAX_BYTES} bytes of UTF-8, got {size}")
    return value  # type: ignore[no-any-return]


def check_pod_id(param: str, value: Any, config: Config) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT32:  # type() so that a bool is refused
        raise InvalidArgument(f"{param} must be an integer in 0..{MAX_INT32}, got {_shown(value)}")
    return value


def check_persist_seconds(param: str, value: Any, config: Config) -> int:
    if type(value) is not int or not (value == -1 or 1 <= value <= MAX_INT32):
        raise InvalidArgument(f"{param} must be -1 (persistent) or 1..{MAX_INT32} seconds, got {_shown(value)}")
    return value


def check_load(param: str, value: Any, config: Config) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT32:
        raise InvalidArgument(f"{param} must be an integer in 0..{MAX_INT32}, got {_shown(value)}")
    return value


ERROR_FORMATS = ("map", "string")


def check_error_format(param: str, value: Any, config: Config) -> str:
    if type(value) is not str or value not in ERROR_FORMATS:
        raise InvalidArgument(f"{param} must be \"map\" or \"string\", got {_shown(value)}")
    return value


def _list_of(item_check: Check) -> Check:
    """The check of a list param whose items ``item_check`` checks, at most --max-list-items of them."""

    def check_list(param: str, value: Any, config: Config) -> list[Any]:
        if type(value) is not list:
            raise InvalidArgument(f"{param} must be an array, got {_type_name(value)}")
        max_items = config.max_list_items
        if len(value) > max_items:
            raise InvalidArgument(f"{param} holds {len(value)} items; at most {max_items} are allowed")
        return [item_check(f"{param}[{i}]", item, config) for i, item in enumerate(value)]

    return check_list


class Method:
    """One method of the contract: its parameters (name, check) in wire order."""

    __slots__ = ("checks", "name", "of_connection", "params", "sheddable")

    def __init__(self, name: str, params: tuple[tuple[str, Check], ...] = (), *, sheddable: bool = True,
                 of_connection: bool = False):
        self.name = name
        self.params = tuple(p for p, _ in params)
        self.checks = params
        # Its handler acts on the calling connection's own state (handed in before the arguments).
        self.of_connection = of_connection
        # ping and stats are never shed: they cost nothing, and a saturated daemon must neither fail
        # its liveness probe nor hide its numbers from the operator looking into why.
        self.sheddable = sheddable


NS, SERVICE, UID = ("ns", check_name), ("service", check_name), ("uid", check_uid)
POD_ID, STATE, PERSIST = ("pod_id", check_pod_id), ("state", check_state), ("persist_seconds", check_persist_seconds)
LOAD = ("load", check_load)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ping", sheddable=False),
        Method("health"),
        Method("stats", sheddable=False),
        Method("set_error_format", (("format", check_error_format),), of_connection=True),
        Method("set_service_state", (NS, SERVICE, POD_ID, STATE)),
        Method("get_service_state", (NS, SERVICE)),
        Method("set_workload_state", (NS, SERVICE, STATE)),
        Method("get_workload_state", (NS, SERVICE)),
        Method("get_workload_state_batch", (NS, ("services", _list_of(check_name)))),
        Method("set_linked_pod", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("try_set_linked_pod", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("set_linked_pod_if_absent", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("get_linked_pod", (NS, UID, SERVICE)),
        Method("get_linked_pod_if_persist", (NS, UID, SERVICE)),
        Method("batch_get_linked_pod", (NS, ("uids", _list_of(check_uid)), SERVICE)),
        Method("remove_linked_pod", (NS, UID, SERVICE, PERSIST)),
        Method("remove_linked_pod_with_id", (NS, UID, SERVICE, PERSIST, POD_ID)),
        Method("get_link_service", (NS, UID)),
        Method("report_pod_load", (NS, SERVICE, POD_ID, LOAD)),
        Method("compute_linked_pod", (NS, UID, SERVICE, PERSIST)),
        Method("route_user", (NS, UID, SERVICE, PERSIST)),
        Method("hold_pod", (NS, SERVICE, POD_ID, STATE, LOAD), of_connection=True),
        Method("describe_pods", (NS, SERVICE)),
        Method("watch_service", (NS, SERVICE), of_connection=True),
        Method("watch_links", (NS, SERVICE), of_connection=True),
        Method("unwatch", (("watch_id", check_watch_id),), of_connection=True),
    )
}

# What calls.py admits even when the daemon sheds load.
NEVER_SHED = frozenset(name for name, method in METHODS.items() if not method.sheddable)



def validate(name: Any, params: Any, config: Config) -> tuple[Method, list[Any]]:
    """The method called ``name`` and its arguments, every one checked without any I/O.
    Raises UnknownMethod or InvalidArgument."""
    method = METHODS.get(name) if type(name) is str else None
    if method is None:
        shown = name if type(name) is str else _type_name(name)
        raise UnknownMethod(f"unknown method {shown[:100]!r}")
    if type(params) is not list:
        raise InvalidArgument(f"{method.name}: params must be an array, got {_type_name(params)}")
    checks = method.checks
    if len(params) != len(checks):
        raise InvalidArgument(
            f"{method.name} takes {len(checks)} params ({', '.join(method.params) or 'none'}), got {len(params)}"
        )
    return method, [check(param, value, config) for (param, check), value in zip(checks, params, strict=True)]


class Connection(Protocol):
    """What a method of the connection (Method.of_connection) may change: calls.Session."""

    error_format: str

    def on_close(self, callback: Callable[[], None], /) -> None: ...
    def on_writable(self, callback: Callable[[], None], /) -> None: ...
    def notify(self, method: str, params: Any, /) -> bool: ...


class Dispatcher:
    """Validated calls into the executor (and the few methods the daemon answers itself).

    ``start`` validates once and returns the call's one pending object: the executor's future for
    a method of one command, its coroutine for a method of several steps.
    """

    def __init__(self, executor: Executor, config: Config) -> None:
        self._config = config
        # The pods held through this daemon: hold_pod's connections, and the loads they heartbeat.
        self.holds = holds = Holds(executor, config)
        # The watches of this daemon's connections, and the subscriptions under them.
        self.watches = watches = Watches(executor, config)
        own: dict[str, Callable[..., Awaitable[Any]]] = {
            "ping": self._ping, "stats": self._stats, "set_error_format": self._set_error_format,
            "hold_pod": holds.hold, "report_pod_load": holds.report_pod_load,
            "watch_service": watches.watch_service, "watch_links": watches.watch_links, "unwatch": watches.unwatch}
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            name: own.get(name) or getattr(executor, name) for name in METHODS
        }
        # The daemon's numbers (metrics.Observer.snapshot), wired by the server once it has them.
        self.stats: Callable[[], dict[str, Any]] = dict

    def start(self, name: Any, params: Any, connection: Connection) -> Awaitable[Any]:
        """Validate (raises RpcError at once, nothing started) and start the call."""
        method, args = validate(name, params, self._config)
        if method.of_connection:
            return self._handlers[method.name](connection, *args)
        return self._handlers[method.name](*args)

    @staticmethod
    def _ping() -> Awaitable[str]:
        return _done("PONG")  # the daemon is alive; Redis is not consulted

    @staticmethod
    def _set_error_format(connection: Connection, error_format: str) -> Awaitable[None]:
        connection.error_format = error_format
        return _done(None)

    def _stats(self) -> Awaitable[dict[str, Any]]:
        # Taken now, before this call is counted in flight: the numbers do not include the asking.
        return _done(self.stats())


def _done(result: Any) -> asyncio.Future[Any]:
    done = asyncio.get_running_loop().create_future()
    done.set_result(result)
    return done
