"""Argument validation (SPEC section 2, "Arguments") and the dispatcher in front of the executor.

validate() is pure, so most cases need no Redis; the dispatcher tests prove on a real Redis that
a rejected call sends nothing at all (no key, and no command counted by Redis).
"""

from __future__ import annotations

import types
from typing import Any

import msgpack
import pytest
import redis
from support import DaemonFactory, ExecutorRun, RawClient, RedisServer, run_async, running

from statefuld.config import Config
from statefuld.errors import InvalidArgument, UnknownMethod
from statefuld.executor import Executor
from statefuld.rpc import METHODS, Dispatcher, validate

CONFIG = Config(max_list_items=3)
CONNECTION = types.SimpleNamespace(error_format="map")  # the calling connection's own settings
SURROGATE = b"a\xffb".decode("utf-8", "surrogateescape")  # how the wire layer hands over non-UTF-8

# Valid params of every method, in the contract's order; each case below spoils one of them.
VALID: dict[str, list[Any]] = {
    "ping": [],
    "health": [],
    "stats": [],
    "set_error_format": ["string"],
    "set_service_state": ["game", "lobby", 3, "Ready"],
    "get_service_state": ["game", "lobby"],
    "set_workload_state": ["game", "lobby", "Serving"],
    "get_workload_state": ["game", "lobby"],
    "get_workload_state_batch": ["game", ["lobby", "chat"]],
    "set_linked_pod": ["game", "alice", "lobby", 3, -1],
    "try_set_linked_pod": ["game", "alice", "lobby", 3, 60],
    "set_linked_pod_if_absent": ["game", "alice", "lobby", 3, -1],
    "get_linked_pod": ["game", "alice", "lobby"],
    "get_linked_pod_if_persist": ["game", "alice", "lobby"],
    "batch_get_linked_pod": ["game", ["alice", "bob"], "lobby"],
    "remove_linked_pod": ["game", "alice", "lobby", -1],
    "remove_linked_pod_with_id": ["game", "alice", "lobby", 30, 3],
    "get_link_service": ["game", "alice"],
    # Placement, section 2b.
    "report_pod_load": ["game", "lobby", 3, 17],
    "compute_linked_pod": ["game", "alice", "lobby", -1],
    # Liveness, section 2c.
    "route_user": ["game", "alice", "lobby", 30],
    "hold_pod": ["game", "lobby", 3, "Ready", 17],
    "describe_pods": ["game", "lobby"],
    # Watch, section 2d.
    "watch_service": ["game", "lobby"],
    "watch_links": ["game", "lobby"],
    "unwatch": [7],
}

BAD_NAMES = [
    "", "a" * 129, "é" * 65, "a:b", "a{b", "a}b", "a b", "a\tb", "a\nb", "\u3000", "a\u2028b", "a\u00a0b",
    "a\x00b", "a\x7fb", "a\x85b", "a\x9fb", SURROGATE, 5, None, b"lobby", ["lobby"], True,
]
GOOD_NAMES = ["a", "a" * 128, "é" * 64, "lobby-1_EU.west", "ゲーム", "a/b#c"]
BAD_UIDS = ["", "a" * 257, "é" * 129, "a{b", "a}b", "a\x00b", "a\nb", "a\tb", "a\x7fb", "a\x85b", "a\x9fb", SURROGATE,
            7, None, b"alice"]
GOOD_UIDS = ["a", "a" * 256, "é" * 128, "user 1", "u:2", " ", "a\u3000b", "mail@example.com"]
BAD_POD_IDS = [-1, 2**31, 2**64, True, False, 1.0, "3", None]
GOOD_POD_IDS = [0, 1, 2**31 - 1]
BAD_PERSIST = [0, -2, 2**31, True, 1.5, "60", None]
GOOD_PERSIST = [-1, 1, 2**31 - 1]
BAD_STATES = ["", "a" * 4097, "é" * 2049, SURROGATE, 1, None, b"Ready"]
GOOD_STATES = ["a", "a" * 4096, "é" * 2048, "Draining: {0} left\n"]
BAD_LOADS = [-1, 2**31, True, 0.5, "3", None]
GOOD_LOADS = [0, 1, 2**31 - 1]

BAD_FORMATS = ["", "Map", "json", ["map"], None, b"map"]
BAD_WATCH_IDS = [-1, 2**31, True, "1", None, 1.0]
GOOD_FORMATS = ["map", "string"]

BAD_BY_KIND: dict[str, list[Any]] = {"ns": BAD_NAMES, "service": BAD_NAMES, "uid": BAD_UIDS, "pod_id": BAD_POD_IDS,
               "persist_seconds": BAD_PERSIST, "state": BAD_STATES, "load": BAD_LOADS, "format": BAD_FORMATS,
               "watch_id": BAD_WATCH_IDS}
GOOD_BY_KIND: dict[str, list[Any]] = {"ns": GOOD_NAMES, "service": GOOD_NAMES, "uid": GOOD_UIDS, "pod_id": GOOD_POD_IDS,
                "persist_seconds": GOOD_PERSIST, "state": GOOD_STATES, "load": GOOD_LOADS,
                "format": GOOD_FORMATS, "watch_id": [0, 1, 2**31 - 1]}


def spoiled_calls() -> list[tuple[str, list[Any], str]]:
    """(method, params, the parameter the error must name) for every bad value of every param."""
    calls = []
    for method, params in VALID.items():
        for index, name in enumerate(METHODS[method].params):
            if name in ("services", "uids"):
                kind = "service" if name == "services" else "uid"
                bad_lists: list[Any] = ["lobby", None, {"a": 1}, ("a",), ["a"] * 4]
                bad_lists += [[params[index][0], value] for value in BAD_BY_KIND[kind]]
                for value in bad_lists:
                    calls.append((method, [*params[:index], value, *params[index + 1:]], name))
                continue
            for value in BAD_BY_KIND[name]:
                calls.append((method, [*params[:index], value, *params[index + 1:]], name))
    return calls


SPOILED = spoiled_calls()


def test_the_method_table_is_the_contract() -> None:
    assert set(METHODS) == set(VALID)
    expected = {
        "set_service_state": ("ns", "service", "pod_id", "state"),
        "get_workload_state_batch": ("ns", "services"),
        "batch_get_linked_pod": ("ns", "uids", "service"),
        "remove_linked_pod_with_id": ("ns", "uid", "service", "persist_seconds", "pod_id"),
        "get_link_service": ("ns", "uid"),
        "report_pod_load": ("ns", "service", "pod_id", "load"),
        "compute_linked_pod": ("ns", "uid", "service", "persist_seconds"),
        "route_user": ("ns", "uid", "service", "persist_seconds"),
        "hold_pod": ("ns", "service", "pod_id", "state", "load"),
        "watch_service": ("ns", "service"),
        "watch_links": ("ns", "service"),
        "unwatch": ("watch_id",),
    }
    for method, params in expected.items():
        assert METHODS[method].params == params


@pytest.mark.parametrize(("method", "params", "param"), SPOILED,
                         ids=[f"{m}-{p}-{i}" for i, (m, _, p) in enumerate(SPOILED)])
def test_every_bad_value_is_invalid_argument_naming_its_parameter(method: str, params: list[Any],
                                                                  param: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(method, params, CONFIG)
    # The message leads with the parameter's name (list items as "uids[1]").
    assert info.value.message.startswith(param), info.value.message
    assert info.value.to_wire()["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("param", "value", "shown"), [
    ("pod_id", -5, "got -5"), ("pod_id", 2**31, "got 2147483648"), ("pod_id", 2**64 - 1, "got 18446744073709551615"),
    ("pod_id", True, "got bool"), ("pod_id", "three", "got str"), ("load", -1, "got -1"),
    ("load", -(2**63), "got -9223372036854775808"), ("persist_seconds", 0, "got 0"),
    ("persist_seconds", None, "got nil"),
])
def test_an_out_of_range_int_is_shown_in_the_message(param: str, value: Any, shown: str) -> None:
    method = "report_pod_load" if param == "load" else "set_linked_pod"
    params = list(VALID[method])
    params[METHODS[method].params.index(param)] = value
    with pytest.raises(InvalidArgument) as info:
        validate(method, params, CONFIG)
    assert info.value.message.endswith(shown), info.value.message


def test_a_huge_int_is_cut_in_the_message() -> None:
    # Not from the wire (msgpack ints have at most 20 digits), but a message stays short anyway.
    with pytest.raises(InvalidArgument) as info:
        validate("set_linked_pod", ["game", "alice", "lobby", 10**100, -1], CONFIG)
    assert info.value.message.endswith("got 100000000000000000000000..."), info.value.message


@pytest.mark.parametrize("kind", sorted(GOOD_BY_KIND))
def test_values_at_the_edges_of_the_rules_are_accepted(kind: str) -> None:
    for method, params in VALID.items():
        names = METHODS[method].params
        if kind not in names:
            continue
        index = names.index(kind)
        for value in GOOD_BY_KIND[kind]:
            _, args = validate(method, [*params[:index], value, *params[index + 1:]], CONFIG)
            assert args[index] == value


def test_valid_calls_pass_unchanged() -> None:
    for method, params in VALID.items():
        spec, args = validate(method, list(params), CONFIG)
        assert spec.name == method and list(args) == params


def test_lists_up_to_the_configured_size() -> None:
    assert validate("batch_get_linked_pod", ["g", ["a", "b", "c"], "s"], CONFIG)[1][1] == ["a", "b", "c"]
    assert validate("batch_get_linked_pod", ["g", [], "s"], CONFIG)[1][1] == []
    with pytest.raises(InvalidArgument, match="uids"):
        validate("batch_get_linked_pod", ["g", ["a"] * 4, "s"], CONFIG)
    # The default bound is the contract's 10,000.
    assert len(validate("get_workload_state_batch", ["g", ["s"] * 10_000], Config())[1][1]) == 10_000
    with pytest.raises(InvalidArgument, match="services"):
        validate("get_workload_state_batch", ["g", ["s"] * 10_001], Config())


@pytest.mark.parametrize("method", sorted(VALID))
def test_wrong_arity_is_invalid_argument(method: str) -> None:
    params = VALID[method]
    for wrong in (params[:-1] if params else None, [*params, "extra"]):
        if wrong is None:
            continue
        with pytest.raises(InvalidArgument) as info:
            validate(method, wrong, CONFIG)
        assert method in info.value.message


@pytest.mark.parametrize("params", [None, {}, "ns", ("game", "lobby"), 3])
def test_params_that_are_not_an_array_are_invalid_argument(params: Any) -> None:
    with pytest.raises(InvalidArgument):
        validate("get_service_state", params, CONFIG)


@pytest.mark.parametrize("method", ["nope", "", "PING", "get_linked_pod ", None, 5, b"ping", ["ping"]])
def test_unknown_methods(method: Any) -> None:
    with pytest.raises(UnknownMethod) as info:
        validate(method, [], CONFIG)
    assert info.value.to_wire()["code"] == "UNKNOWN_METHOD"


# --- the dispatcher on a real Redis ------------------------------------------------------------


# Commands Redis receives on its own schedule, none of them ours to send for a call: our INFO,
# replicas' REPLCONF ACK, sentinels' PING/PUBLISH/ROLE, the cluster transport's periodic refresh.
_BACKGROUND = ("cmdstat_info", "cmdstat_replconf", "cmdstat_ping", "cmdstat_publish", "cmdstat_role",
               "cmdstat_cluster|")


def command_counts(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    # Everything else must stay as it was.
    return {name: int(value["calls"]) for name, value in stats.items() if not name.startswith(_BACKGROUND)}


def test_rejected_calls_send_nothing_to_redis(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        dispatcher = Dispatcher(ex, CONFIG)
        before = command_counts(redis_db)
        for method, params, param in SPOILED:
            with pytest.raises(InvalidArgument, match=param):
                await dispatcher.start(method, params, CONNECTION)
        for unknown in ("nope", None):
            with pytest.raises(UnknownMethod):
                await dispatcher.start(unknown, [], CONNECTION)
        with pytest.raises(InvalidArgument):
            await dispatcher.start("set_linked_pod", ["game", "alice", "lobby", 3], CONNECTION)
        return before, command_counts(redis_db)

    before, after = with_executor(body)
    assert after == before
    assert redis_db.dbsize() == 0


def test_dispatch_results_are_msgpack_ready(with_executor: ExecutorRun) -> None:
    async def body(ex: Executor) -> Any:
        dispatcher = Dispatcher(ex, CONFIG)

        def d(name: str, params: list[Any]) -> Any:
            return dispatcher.start(name, params, CONNECTION)
        return [
            await d("ping", []),
            await d("set_service_state", ["game", "lobby", 3, "Ready"]),
            await d("get_service_state", ["game", "lobby"]),
            await d("set_linked_pod", ["game", "alice", "lobby", 3, -1]),
            await d("try_set_linked_pod", ["game", "alice", "lobby", 4, -1]),
            await d("batch_get_linked_pod", ["game", ["alice", "bob"], "lobby"]),
            await d("get_link_service", ["game", "alice"]),
            await d("remove_linked_pod", ["game", "alice", "lobby", -1]),
            await d("health", []),
        ]

    results = with_executor(body)
    assert msgpack.unpackb(msgpack.packb(results), strict_map_key=False) == [
        "PONG", None, {3: "Ready"}, None, [False, 3], {3: ["alice"]}, {"lobby": 3}, True,
        {"ready": True, "redis": "ok"},
    ]


def test_ping_does_not_need_redis() -> None:
    with running(RedisServer()) as server:
        async def body() -> Any:
            ex = await Executor.connect(Config(redis_url=server.url, startup_timeout_s=5))
            try:
                server.kill()
                dispatcher = Dispatcher(ex, CONFIG)
                return await dispatcher.start("ping", [], CONNECTION), await dispatcher.start("health", [], CONNECTION)
            finally:
                await ex.close()

        pong, health = run_async(body)
    assert pong == "PONG"
    assert health["ready"] is False


def _wire_cases() -> list[tuple[bytes, str]]:
    """SPOILED as request bytes (msgid = index) with the param each error must name. Values that
    msgpack cannot carry (2**64) or carries as something else (a tuple is an array) are left out;
    a lone surrogate goes out as the non-UTF-8 bytes it stands for."""
    cases = []
    for msgid, (method, params, param) in enumerate(SPOILED):
        if any(type(p) is tuple for p in params):
            continue
        try:
            request = msgpack.packb([0, msgid, method, params], unicode_errors="surrogateescape")
        except OverflowError:
            continue
        cases.append((request, param))
    return cases


def test_over_the_wire_every_bad_value_is_refused_and_redis_untouched(redis_server: RedisServer,
                                                                      redis_db: redis.Redis,
                                                                      tmp_daemon: DaemonFactory) -> None:
    # Through the daemon, with this module's list bound.
    daemon = tmp_daemon(redis_server.url, args=["--max-list-items", str(CONFIG.max_list_items)]).start()
    cases = _wire_cases()
    before = command_counts(redis_db)
    with RawClient(daemon.socket_path, timeout_s=10) as client:
        client.send_bytes(b"".join(request for request, _ in cases))
        replies = {msgid: error for msgid, (error, _) in client.replies(len(cases)).items()}
    after = command_counts(redis_db)
    for request, param in cases:
        msgid = msgpack.unpackb(request, unicode_errors="surrogateescape")[1]
        error = replies[msgid]
        assert error["code"] == "INVALID_ARGUMENT" and error["message"].startswith(param), (request, error)
    # The daemon's start-up (PING, SCRIPT LOAD, ...) and health probes came before `before`.
    assert {k: v for k, v in after.items() if k != "cmdstat_ping"} == \
        {k: v for k, v in before.items() if k != "cmdstat_ping"}
    assert redis_db.dbsize() == 0
