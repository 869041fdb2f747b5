"""docs/MIGRATION.md, statement by statement, on statefuld's side: each test is named after the
section of the guide it backs. (The executors' side is stated there as a fact about them.)"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from support import NS, SVC, Daemon, ExecutorRun, link_hash_key, link_key, rpc_call, states_key

from statefuld.config import Config
from statefuld.executor import Executor
from statefuld.scripts import load_scripts


def call(daemon: Daemon, method: str, *params: Any) -> Any:
    error, result = rpc_call(daemon.socket_path, method, list(params))
    assert error is None, error
    return result


def error_of(daemon: Daemon, method: str, *params: Any) -> str:
    error, _ = rpc_call(daemon.socket_path, method, list(params))
    assert error is not None
    return f"{error['code']}: {error['message']}"


def test_keep_the_prefix_sf(daemon: Daemon, redis_db: redis.Redis) -> None:
    assert Config().key_prefix == "sf"
    call(daemon, "set_linked_pod", NS, "alice", SVC, 3, -1)
    assert sorted(redis_db.keys("*")) == [link_hash_key("alice"), link_key("alice")]
    assert link_key("alice") == "sf:{game:lk:alice}lobby"


def test_remove_with_persist_seconds_keeps_a_temporary_link(daemon: Daemon, redis_db: redis.Redis) -> None:
    call(daemon, "set_linked_pod", NS, "alice", SVC, 3, -1)
    assert call(daemon, "remove_linked_pod", NS, "alice", SVC, 300) is True
    assert call(daemon, "get_linked_pod", NS, "alice", SVC) == 3  # a reconnect in the window returns to pod 3
    assert 299 <= redis_db.ttl(link_key("alice")) <= 300
    assert not redis_db.exists(link_hash_key("alice"))  # no longer listed as persistent
    assert call(daemon, "get_link_service", NS, "alice") == {}


def test_try_set_linked_pod_answers_a_pair(daemon: Daemon, redis_db: redis.Redis) -> None:
    assert call(daemon, "try_set_linked_pod", NS, "alice", SVC, 3, -1) == [True, 3]  # no link: linked
    assert redis_db.get(link_key("alice")) == "3"
    assert call(daemon, "try_set_linked_pod", NS, "alice", SVC, 4, -1) == [False, 3]  # refused, unchanged
    assert redis_db.get(link_key("alice")) == "3"


@pytest.mark.parametrize("stored", ["", "null", "nil"])
def test_workload_states_that_mean_none_to_the_go_executor(stored: str, daemon: Daemon,
                                                             redis_db: redis.Redis) -> None:
    redis_db.set(f"sf:{{{NS}:workload:{SVC}}}", stored)  # as an executor may have written it
    assert call(daemon, "get_workload_state", NS, SVC) == stored
    assert call(daemon, "get_workload_state_batch", NS, [SVC]) == {SVC: stored}
    assert error_of(daemon, "set_workload_state", NS, SVC, "").startswith("INVALID_ARGUMENT: state")


def test_a_uid_listed_twice_is_answered_once(daemon: Daemon) -> None:
    call(daemon, "set_linked_pod", NS, "alice", SVC, 3, -1)
    assert call(daemon, "batch_get_linked_pod", NS, ["alice", "bob", "alice"], SVC) == {3: ["alice"]}


@pytest.mark.parametrize(("method", "params", "param"), [
    ("set_linked_pod", [NS, "alice", SVC, 3, 0], "persist_seconds"),
    ("get_linked_pod", [NS, "a{b}", SVC], "uid"),
    ("get_linked_pod", ["my game", "alice", SVC], "ns"),
    ("get_linked_pod", ["a:b", "alice", SVC], "ns"),
    ("get_service_state", [NS, "lob by"], "service"),
    ("set_service_state", [NS, SVC, 1, ""], "state"),
])
def test_values_the_executors_wrote_unchecked_are_refused(method: str, params: list[Any], param: str,
                                                          daemon: Daemon, redis_db: redis.Redis) -> None:
    # Data an executor wrote under such names stays as it is, out of statefuld's reach.
    redis_db.set("sf:{game:lk:a{b}}lobby", "3")
    redis_db.set("sf:{my game:lk:alice}lobby", "3")
    before = {k: redis_db.get(k) for k in redis_db.keys("*")}
    assert error_of(daemon, method, *params).startswith(f"INVALID_ARGUMENT: {param}")
    assert {k: redis_db.get(k) for k in redis_db.keys("*")} == before


def test_pods_never_given_a_state_are_gone_and_their_users_move(with_executor: ExecutorRun,
                                                                redis_db: redis.Redis) -> None:
    # Links set by an application that never reported pod states, as with the old executors.
    redis_db.set(link_key("alice"), "7")
    redis_db.hset(link_hash_key("alice"), SVC, "7")

    async def body(ex: Executor) -> Any:
        await ex.hold_pod(NS, SVC, 1, "Ready", 0)
        return await ex.route_user(NS, "alice", SVC, -1)

    assert with_executor(body) == {"pod_id": 1, "previous": 7, "outcome": "moved"}


def test_writing_the_pods_states_first_keeps_their_users(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    redis_db.set(link_key("alice"), "7")
    redis_db.hset(states_key(), "7", "DENY_NEW_CALL")  # neither routable nor gone: alive, no new users

    async def body(ex: Executor) -> Any:
        await ex.hold_pod(NS, SVC, 1, "Ready", 0)
        return await ex.route_user(NS, "alice", SVC, -1), await ex.route_user(NS, "bob", SVC, -1)

    kept, new = with_executor(body)
    assert kept == {"pod_id": 7, "previous": 7, "outcome": "kept"}
    assert new["pod_id"] == 1


def test_the_old_route_layers_states_can_be_made_routable_and_gone(with_executor: ExecutorRun,
                                                                    redis_db: redis.Redis) -> None:
    redis_db.set(link_key("alice"), "7")
    redis_db.hset(states_key(), mapping={"7": "STOPPED", "1": "ALLOW_ALL"})
    redis_db.hset(f"{states_key()}load", "1", f"0:{int(redis_db.time()[0]) * 1000}")

    async def body(ex: Executor) -> Any:
        return await ex.route_user(NS, "alice", SVC, -1)

    routed = with_executor(body, gone_state=("Down", "STOPPED"), routable_state=("Ready", "ALLOW_ALL"))
    assert routed == {"pod_id": 1, "previous": 7, "outcome": "moved"}


def test_the_scripts_are_statefulds_own(redis_db: redis.Redis, with_executor: ExecutorRun) -> None:
    scripts = load_scripts()
    assert {"set_linked_pod", "pick_pod", "replace_linked_pod", "hold_pod"} <= set(scripts)

    async def body(ex: Executor) -> None:
        await ex.load_scripts()

    with_executor(body)
    # Loaded by the SHA of each file as it is: nothing shared with an executor's script cache.
    assert all(redis_db.script_exists(s.sha) == [True] for s in scripts.values())
