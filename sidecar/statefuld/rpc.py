"""The method table and argument validation: what each method takes, checked before any Redis work.

Every rule is the contract's (section 2, "Arguments"); a rejected call raises InvalidArgument
naming the parameter as the contract names it, and nothing reaches Redis.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from statefuld.config import Config
from statefuld.errors import InvalidArgument, UnknownMethod
from statefuld.executor import Executor
from statefuld.redis_mux import ReplyError, Waiter

MAX_INT32 = 2**31 - 1
NAME_MAX_BYTES = 128
UID_MAX_BYTES = 256
STATE_MAX_BYTES = 4096

# ASCII characters refused outright; non-ASCII strings take the slower Unicode path below.
_NAME_BAD_ASCII = re.compile(r"[\x00-\x20\x7f:{}]")
_UID_BAD_ASCII = re.compile(r"[\x00-\x1f\x7f{}]")

Check = Callable[[str, Any], Any]


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


def check_name(param: str, value: Any) -> str:
    """ns and service: 1..128 bytes, no ':' '{' '}', no Unicode whitespace, no control characters."""
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
    return value  # type: ignore[no-any-return]


def check_uid(param: str, value: Any) -> str:
    """uid: 1..256 bytes, no '{' '}' or control characters (spaces and ':' are fine)."""
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


def check_state(param: str, value: Any) -> str:
    size = _utf8_size(param, value)
    if not 1 <= size <= STATE_MAX_BYTES:
        raise InvalidArgument(f"{param} must be 1..{STATE_MAX_BYTES} bytes of UTF-8, got {size}")
    return value  # type: ignore[no-any-return]


def check_pod_id(param: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT32:  # type() so that a bool is refused
        raise InvalidArgument(f"{param} must be an integer in 0..{MAX_INT32}, got {_shown(value)}")
    return value


def check_persist_seconds(param: str, value: Any) -> int:
    if type(value) is not int or not (value == -1 or 1 <= value <= MAX_INT32):
        raise InvalidArgument(f"{param} must be -1 (persistent) or 1..{MAX_INT32} seconds, got {_shown(value)}")
    return value


def check_load(param: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT32:
        raise InvalidArgument(f"{param} must be an integer in 0..{MAX_INT32}, got {_shown(value)}")
    return value


class Method:
    __slots__ = ("checks", "handler_name", "name", "params")

    def __init__(self, name: str, params: tuple[tuple[str, Check | str], ...], handler_name: str | None = None):
        self.name = name
        self.params = tuple(p for p, _ in params)
        self.checks = params
        self.handler_name = handler_name or name


NS, SERVICE, UID = ("ns", check_name), ("service", check_name), ("uid", check_uid)
POD_ID, STATE, PERSIST = ("pod_id", check_pod_id), ("state", check_state), ("persist_seconds", check_persist_seconds)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ping", ()),
        Method("health", ()),
        Method("stats", ()),
        Method("set_service_state", (NS, SERVICE, POD_ID, STATE)),
        Method("get_service_state", (NS, SERVICE)),
        Method("set_workload_state", (NS, SERVICE, STATE)),
        Method("get_workload_state", (NS, SERVICE)),
        Method("get_workload_state_batch", (NS, ("services", "list:service"))),
        Method("set_linked_pod", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("try_set_linked_pod", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("set_linked_pod_if_absent", (NS, UID, SERVICE, POD_ID, PERSIST)),
        Method("get_linked_pod", (NS, UID, SERVICE)),
        Method("get_linked_pod_if_persist", (NS, UID, SERVICE)),
        Method("batch_get_linked_pod", (NS, ("uids", "list:uid"), SERVICE)),
        Method("remove_linked_pod", (NS, UID, SERVICE, PERSIST)),
        Method("remove_linked_pod_with_id", (NS, UID, SERVICE, PERSIST, POD_ID)),
        Method("get_link_service", (NS, UID)),
        Method("report_pod_load", (NS, SERVICE, POD_ID, ("load", check_load))),
        Method("compute_linked_pod", (NS, UID, SERVICE, PERSIST)),
    )
}

_LIST_ITEM_CHECKS: dict[str, Check] = {"list:service": check_name, "list:uid": check_uid}


def _check_list(param: str, value: Any, item_check: Check, max_items: int) -> list[Any]:
    if type(value) is not list:
        raise InvalidArgument(f"{param} must be an array, got {_type_name(value)}")
    if len(value) > max_items:
        raise InvalidArgument(f"{param} holds {len(value)} items; at most {max_items} are allowed")
    return [item_check(f"{param}[{i}]", item) for i, item in enumerate(value)]


def validate(method: Any, params: Any, config: Config) -> tuple[Method, list[Any]]:
    """Check a call without any I/O: the method, its arity, every parameter. Raises RpcError."""
    spec = METHODS.get(method) if type(method) is str else None
    if spec is None:
        shown = method if type(method) is str else _type_name(method)
        raise UnknownMethod(f"unknown method {shown[:100]!r}")
    if type(params) is not list:
        raise InvalidArgument(f"{spec.name}: params must be an array, got {_type_name(params)}")
    if len(params) != len(spec.checks):
        raise InvalidArgument(
            f"{spec.name} takes {len(spec.checks)} params ({', '.join(spec.params) or 'none'}), got {len(params)}"
        )
    args = []
    for (param, check), value in zip(spec.checks, params, strict=True):
        if isinstance(check, str):
            args.append(_check_list(param, value, _LIST_ITEM_CHECKS[check], config.max_list_items))
        else:
            args.append(check(param, value))
    return spec, args


class Dispatcher:
    """Validated calls into the executor; results shaped for msgpack.

    ``start`` is what the server calls: it validates and starts the call without a coroutine of
    its own and returns ``(awaitable, decode)``. For the hot methods the awaitable is the Redis
    reply's future itself and ``decode`` turns the raw reply into the result, so the server can
    answer from the future's done-callback: no Task per request (docs/BENCHMARKS.md, profile).
    ``dispatch`` is the same call as one coroutine.
    """

    def __init__(self, executor: Executor, config: Config) -> None:
        self._executor = executor
        self._config = config
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            name: getattr(executor, m.handler_name) for name, m in METHODS.items() if name not in _DAEMON_METHODS
        }
        self._handlers["stats"] = self._stats
        # The daemon's numbers (metrics.Observer.snapshot), wired by the server once it has them.
        self.stats: Callable[[], dict[str, Any]] = dict
        # The methods started without validate() or a coroutine; the server looks them up here first.
        self.hot: dict[str, Callable[[Any, Waiter | None], tuple[Awaitable[Any] | None, Decode | None]]] = {
            "get_linked_pod": self._start_get_linked_pod,
            "set_linked_pod": self._start_set_linked_pod,
        }
        # ns and service values already found valid: a handful of distinct values in practice,
        # so most calls check them with one set lookup. Bounded: cleared when full.
        self._names_ok: set[str] = set()

    async def dispatch(self, method: Any, params: Any) -> Any:
        spec, args = validate(method, params, self._config)
        if spec.name == "ping":
            return "PONG"  # the daemon is alive; Redis is not consulted
        result = await self._handlers[spec.name](*args)
        return _shape(result)

    def start(
        self, method: Any, params: Any, waiter: Waiter | None = None
    ) -> tuple[Awaitable[Any] | None, Decode | None]:
        """Validate (raises RpcError at once) and start the call; see the class docstring.

        A hot method may hand its raw reply to ``waiter`` (redis_mux.Waiter) instead of a future:
        then the awaitable returned is None."""
        hot = self.hot.get(method) if type(method) is str else None
        if hot is not None:
            return hot(params, waiter)
        spec, args = validate(method, params, self._config)
        if spec.name == "ping":
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result("PONG")  # the daemon is alive; Redis is not consulted
            return done, None
        return self._handlers[spec.name](*args), _shape

    def recover(self, method: Any, params: Any, exc: BaseException) -> Awaitable[Any]:
        """A started call's awaitable failed with ``exc`` (not an RpcError): raise the error to
        answer with, or return the awaitable to continue with (NOSCRIPT: reload, run again)."""
        if isinstance(exc, ReplyError):
            if exc.code == "NOSCRIPT":  # the script did not run: the full path reloads it and retries
                return self.dispatch(method, params)
            raise self._executor.reply_error(exc) from exc
        raise exc

    async def _stats(self) -> dict[str, Any]:
        return self.stats()

    # --- the hot methods: the checks of validate(), inlined, with the names' cache --------------

    def _name(self, param: str, value: Any) -> str:
        names_ok = self._names_ok
        if type(value) is str and value in names_ok:
            return value
        checked = check_name(param, value)
        if len(names_ok) >= _NAMES_CACHED:
            names_ok.clear()
        names_ok.add(checked)
        return checked

    # The cache is consulted here rather than in _name, which these calls then skip: a call per
    # name costs as much as the lookup.

    def _start_get_linked_pod(self, params: Any, waiter: Waiter | None) -> tuple[Awaitable[Any] | None, Decode | None]:
        if type(params) is not list or len(params) != 3:
            validate("get_linked_pod", params, self._config)  # raises the error naming what is wrong
        ns, uid, service = params
        names_ok = self._names_ok
        if type(ns) is not str or ns not in names_ok:
            ns = self._name("ns", ns)
        if type(service) is not str or service not in names_ok:
            service = self._name("service", service)
        return self._executor.begin_get_linked_pod(ns, _uid(uid), service, waiter)

    def _start_set_linked_pod(self, params: Any, waiter: Waiter | None) -> tuple[Awaitable[Any] | None, Decode | None]:
        if type(params) is not list or len(params) != 5:
            validate("set_linked_pod", params, self._config)
        ns, uid, service, pod_id, persist_seconds = params
        names_ok = self._names_ok
        if type(ns) is not str or ns not in names_ok:
            ns = self._name("ns", ns)
        uid = _uid(uid)
        if type(service) is not str or service not in names_ok:
            service = self._name("service", service)
        return self._executor.begin_set_linked_pod(
            ns, uid, service, check_pod_id("pod_id", pod_id), check_persist_seconds("persist_seconds", persist_seconds),
            waiter)


_NAMES_CACHED = 1024
_DAEMON_METHODS = frozenset({"ping", "stats"})  # answered by the daemon itself, not the executor
Decode = Callable[[Any], Any]


def _uid(value: Any) -> str:
    # ASCII: printable is exactly "no control character" (0x00-0x1f, 0x7f), and 1 char = 1 byte.
    if type(value) is str and value.isascii() and value.isprintable() and 0 < len(value) <= UID_MAX_BYTES \
            and "{" not in value and "}" not in value:
        return value
    return check_uid("uid", value)


def _shape(result: Any) -> Any:
    # try_set_linked_pod's (ok, pod_id): an array on the wire, and a list for msgpack-ready.
    return list(result) if type(result) is tuple else result
