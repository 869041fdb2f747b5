"""The executor against a real redis-server: every method's result and the exact data it leaves.

The keys and values checked here are the layout of SPEC section 1, the one the Go and Java
executors read and write, so both directions are tested: what statefuld writes is that layout,
and data written in that layout by plain Redis commands reads back correctly.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from support import Daemon, ExecutorRun, RedisServer, free_port, rpc_call, run_async, running

from statefuld.config import Config
from statefuld.errors import Internal, RpcError, Unavailable
from statefuld.executor import Executor

NS, UID, SVC = "game", "alice", "lobby"
HASH = "sf:{game:lk:alice}"
LINK = "sf:{game:lk:alice}lobby"


def keys_and_types(r: redis.Redis) -> dict[str, str]:
    return {str(key): str(r.type(key)) for key in r.keys("*")}


# --- states ----------------------------------------------------------------------------------


def test_service_state_is_one_hash_of_pod_id_to_state(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        empty = await ex.get_service_state(NS, SVC)
        await ex.set_service_state(NS, SVC, 3, "Ready")
        await ex.set_service_state(NS, SVC, 12, "Draining")
        await ex.set_service_state(NS, SVC, 3, "Ready again")
        return empty, await ex.get_service_state(NS, SVC)

    assert with_executor(body) == ({}, {3: "Ready again", 12: "Draining"})
    assert keys_and_types(redis_db) == {"sf:{game:state:lobby}": "hash"}
    assert redis_db.hgetall("sf:{game:state:lobby}") == {"3": "Ready again", "12": "Draining"}


def test_service_state_skips_fields_that_are_not_decimal_pod_ids(with_executor: ExecutorRun,
                                                                 redis_db: redis.Redis) -> None:
    key = "sf:{game:state:lobby}"
    redis_db.hset(key, mapping={"7": "Ready", "load": "x", "-1": "x", "": "x", "3.0": "x", "\u0663": "x"})
    assert with_executor(lambda ex: ex.get_service_state(NS, SVC)) == {7: "Ready"}


TOO_BIG = "2147483648"  # a decimal integer, but not a pod id (0..2^31-1): msgpack may not even carry it


def test_stored_ids_beyond_the_pod_id_range_are_skipped_or_refused_not_crashed_on(daemon: Daemon,
                                                                                 redis_db: redis.Redis) -> None:
    # Another tool's data; over the wire, so the reply must also encode.
    huge = "123456789012345678901234567890"
    redis_db.hset("sf:{game:state:lobby}", mapping={"1": "Ready", "2147483647": "Ready", TOO_BIG: "x", huge: "x"})
    redis_db.hset(HASH, mapping={SVC: "3", "chat": huge, "voice": TOO_BIG})
    redis_db.set(LINK, huge)
    assert rpc_call(daemon.socket_path, "get_service_state", [NS, SVC]) == (None, {1: "Ready", 2147483647: "Ready"})
    assert rpc_call(daemon.socket_path, "get_link_service", [NS, UID]) == (None, {SVC: 3})
    error, _ = rpc_call(daemon.socket_path, "get_linked_pod", [NS, UID, SVC])
    assert error["code"] == "INTERNAL" and "pod id" in error["message"], error
    # A batch leaves the unreadable user out and still answers for the others.
    redis_db.set("sf:{game:lk:bob}lobby", "4")
    assert rpc_call(daemon.socket_path, "batch_get_linked_pod", [NS, [UID, "bob"], SVC]) == (None, {4: ["bob"]})


def test_a_batch_leaves_out_users_whose_link_holds_no_pod_id(with_executor: ExecutorRun,
                                                            redis_db: redis.Redis) -> None:
    redis_db.set("sf:{game:lk:a}lobby", "1")
    redis_db.set("sf:{game:lk:b}lobby", "0x7")  # not a pod id
    redis_db.hset("sf:{game:lk:c}lobby", "x", "y")  # not even a string: MGET reads it as nil
    redis_db.set("sf:{game:lk:d}lobby", "1")

    async def body(ex: Executor) -> Any:
        single = []
        for uid in ("b", "c"):
            with pytest.raises(RpcError) as info:
                await ex.get_linked_pod(NS, uid, SVC)
            single.append(info.value.code)
        return single, await ex.batch_get_linked_pod(NS, ["a", "b", "c", "d"], SVC)

    assert with_executor(body) == (["INTERNAL", "INTERNAL"], {1: ["a", "d"]})


def test_two_state_fields_for_one_pod_read_as_the_canonical_one(with_executor: ExecutorRun,
                                                                redis_db: redis.Redis) -> None:
    for order in (("01", "1"), ("1", "01")):  # whichever Redis lists first
        redis_db.delete("sf:{game:state:lobby}")
        for field in order:
            redis_db.hset("sf:{game:state:lobby}", field, "canonical" if field == "1" else "zero-padded")
        redis_db.hset("sf:{game:state:lobby}", "002", "only padded")
        assert with_executor(lambda ex: ex.get_service_state(NS, SVC)) == {1: "canonical", 2: "only padded"}


FOREIGN = ("abc", TOO_BIG, " 7", "")  # link values another tool may leave that are not pod ids


@pytest.mark.parametrize("foreign", FOREIGN)
def test_set_linked_pod_over_a_value_that_is_not_a_pod_id_succeeds_with_nil(
        foreign: str, with_executor: ExecutorRun, redis_db: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # The script has overwritten the value before its reply is decoded: an error would tell the
    # caller that a write which happened had failed (PROTOCOL.md, "Link values that are not pod ids").
    redis_db.set(LINK, foreign)
    redis_db.set(HASH + "chat", foreign, ex=100)

    async def body(ex: Executor) -> Any:
        return await ex.set_linked_pod(NS, UID, SVC, 3, -1), await ex.set_linked_pod(NS, UID, "chat", 4, 60)

    with caplog.at_level("WARNING", logger="statefuld.executor"):
        assert with_executor(body) == (None, None)
    assert redis_db.get(LINK) == "3" and redis_db.ttl(LINK) == -1
    assert redis_db.hgetall(HASH) == {SVC: "3"}
    assert redis_db.get(HASH + "chat") == "4"
    # Logged once per daemon, without the value (it may be user data).
    warnings = [r for r in caplog.records if "not a pod id" in r.getMessage()]
    assert len(warnings) == 1, caplog.records
    assert foreign == "" or foreign not in warnings[0].getMessage()


def test_refusals_over_a_value_that_is_not_a_pod_id_change_nothing(with_executor: ExecutorRun,
                                                                   redis_db: redis.Redis) -> None:
    # The value holds the user (it is a link, whatever it says), but cannot be answered as a
    # pod id: a refusal answers INTERNAL, and INTERNAL here always means nothing was written.
    redis_db.set(LINK, "abc")
    redis_db.hset(HASH, SVC, "abc")
    before = (redis_db.get(LINK), redis_db.ttl(LINK), redis_db.hgetall(HASH))

    async def refused(ex: Executor) -> list[str]:
        messages = []
        for call in (ex.try_set_linked_pod(NS, UID, SVC, 4, -1), ex.set_linked_pod_if_absent(NS, UID, SVC, 4, 60),
                     ex.compute_linked_pod(NS, UID, SVC, -1)):
            with pytest.raises(Internal) as info:
                await call
            messages.append(info.value.message)
        assert await ex.remove_linked_pod_with_id(NS, UID, SVC, -1, 4) is False
        return messages

    for message in with_executor(refused):
        assert "pod id" in message and "abc" not in message, message
    assert (redis_db.get(LINK), redis_db.ttl(LINK), redis_db.hgetall(HASH)) == before

    # Where the call writes, it succeeds: try_set over a temporary value, remove over any value.
    redis_db.expire(LINK, 100)

    async def written(ex: Executor) -> Any:
        return await ex.try_set_linked_pod(NS, UID, SVC, 4, -1), await ex.remove_linked_pod(NS, UID, SVC, -1)

    assert with_executor(written) == ((True, 4), True)
    assert redis_db.dbsize() == 0


def test_a_value_that_is_not_a_pod_id_over_the_wire(daemon: Daemon, redis_db: redis.Redis) -> None:
    # set_linked_pod's reply is decoded in redis_mux's read, and after a SCRIPT FLUSH that of the
    # EVAL that took over (scripts.py's recover): both answer the completed write with nil.
    for flush in (False, True):
        redis_db.set(LINK, "abc")
        if flush:
            redis_db.script_flush()
        assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, UID, SVC, 3, -1]) == (None, None), flush
        assert redis_db.get(LINK) == "3"
    redis_db.set(LINK, "abc")
    error, _ = rpc_call(daemon.socket_path, "try_set_linked_pod", [NS, UID, SVC, 4, -1])
    assert error["code"] == "INTERNAL" and "not changed" in error["message"], error
    assert redis_db.get(LINK) == "abc"


def test_strings_that_are_not_utf8_read_with_replacement_characters(with_executor: ExecutorRun,
                                                                    redis_db: redis.Redis) -> None:
    redis_db.hset("sf:{game:state:lobby}", "1", b"\xffok")
    redis_db.set("sf:{game:workload:lobby}", b"up\xfe")

    async def body(ex: Executor) -> Any:
        return await ex.get_service_state(NS, SVC), await ex.get_workload_state(NS, SVC)

    assert with_executor(body) == ({1: "\ufffdok"}, "up\ufffd")


def test_workload_state_is_one_string_per_service(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        missing = await ex.get_workload_state(NS, SVC)
        await ex.set_workload_state(NS, SVC, "Serving")
        await ex.set_workload_state(NS, "chat", "Stopping ünïcode")
        single = await ex.get_workload_state(NS, SVC)
        batch = await ex.get_workload_state_batch(NS, ["chat", "nothing", SVC, "chat"])
        empty = await ex.get_workload_state_batch(NS, [])
        return missing, single, batch, empty

    assert with_executor(body) == (None, "Serving", {"chat": "Stopping ünïcode", SVC: "Serving"}, {})
    assert keys_and_types(redis_db) == {"sf:{game:workload:lobby}": "string", "sf:{game:workload:chat}": "string"}
    assert redis_db.get("sf:{game:workload:lobby}") == "Serving"
    assert redis_db.ttl("sf:{game:workload:lobby}") == -1


# --- links -----------------------------------------------------------------------------------


def test_persistent_link_layout_and_reads(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        return (
            await ex.set_linked_pod(NS, UID, SVC, 3, -1),
            await ex.set_linked_pod(NS, UID, "chat", 2147483647, -1),
            await ex.get_linked_pod(NS, UID, SVC),
            await ex.get_linked_pod_if_persist(NS, UID, SVC),
            await ex.get_link_service(NS, UID),
            await ex.set_linked_pod(NS, UID, SVC, 4, -1),
        )

    assert with_executor(body) == (None, None, 3, 3, {SVC: 3, "chat": 2147483647}, 3)
    assert keys_and_types(redis_db) == {HASH: "hash", LINK: "string", HASH + "chat": "string"}
    assert redis_db.hgetall(HASH) == {SVC: "4", "chat": "2147483647"}
    assert redis_db.get(LINK) == "4" and redis_db.ttl(LINK) == -1


def test_temporary_link_has_a_ttl_and_is_not_listed(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        return (
            await ex.set_linked_pod(NS, UID, SVC, 5, 60),
            await ex.get_linked_pod(NS, UID, SVC),
            await ex.get_linked_pod_if_persist(NS, UID, SVC),
            await ex.get_link_service(NS, UID),
        )

    assert with_executor(body) == (3, 5, None, {})
    # The emptied hash is gone; the link is a string with the TTL asked for.
    assert keys_and_types(redis_db) == {LINK: "string"}
    assert redis_db.get(LINK) == "5"
    assert 59_000 < redis_db.pttl(LINK) <= 60_000


def test_try_set_linked_pod(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        return (
            await ex.try_set_linked_pod(NS, UID, SVC, 3, 60),  # absent: set (temporary)
            await ex.try_set_linked_pod(NS, UID, SVC, 4, -1),  # temporary link: set (persistent)
            await ex.try_set_linked_pod(NS, UID, SVC, 5, -1),  # persistent to another pod: refused
            await ex.try_set_linked_pod(NS, UID, SVC, 4, -1),  # persistent to the same pod: ok
        )

    assert with_executor(body) == ((True, 3), (True, 4), (False, 4), (True, 4))
    assert redis_db.get(LINK) == "4" and redis_db.ttl(LINK) == -1
    assert redis_db.hgetall(HASH) == {SVC: "4"}


def test_set_linked_pod_if_absent(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        first = await ex.set_linked_pod_if_absent(NS, UID, SVC, 3, 60)
        second = await ex.set_linked_pod_if_absent(NS, UID, SVC, 4, -1)
        persistent = await ex.set_linked_pod_if_absent(NS, "bob", SVC, 7, -1)
        return first, second, persistent, await ex.set_linked_pod_if_absent(NS, "bob", SVC, 8, 60)

    assert with_executor(body) == (3, 3, 7, 7)
    # The temporary link stayed exactly as it was: not made persistent, not listed.
    assert keys_and_types(redis_db) == {LINK: "string", "sf:{game:lk:bob}": "hash", "sf:{game:lk:bob}lobby": "string"}
    assert 59_000 < redis_db.pttl(LINK) <= 60_000
    # The persistent one too: no TTL given, still listed.
    assert redis_db.get("sf:{game:lk:bob}lobby") == "7" and redis_db.ttl("sf:{game:lk:bob}lobby") == -1
    assert redis_db.hgetall("sf:{game:lk:bob}") == {SVC: "7"}


def test_remove_linked_pod_now_and_with_a_linger(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        await ex.set_linked_pod(NS, UID, "chat", 4, -1)
        lingered = await ex.remove_linked_pod(NS, UID, SVC, 60)
        after_linger = (await ex.get_linked_pod(NS, UID, SVC), await ex.get_link_service(NS, UID))
        deleted = await ex.remove_linked_pod(NS, UID, "chat", -1)
        again = await ex.remove_linked_pod(NS, UID, "chat", -1)
        return lingered, after_linger, deleted, again

    assert with_executor(body) == (True, (3, {"chat": 4}), True, False)
    assert keys_and_types(redis_db) == {LINK: "string"}
    assert 59_000 < redis_db.pttl(LINK) <= 60_000


def test_a_linger_really_expires(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        assert await ex.remove_linked_pod(NS, UID, SVC, 1)
        assert await ex.get_linked_pod(NS, UID, SVC) == 3  # a reconnect within the linger
        assert 0 < redis_db.pttl(LINK) <= 1000
        deadline = time.monotonic() + 3
        while await ex.get_linked_pod(NS, UID, SVC) is not None:
            assert time.monotonic() < deadline, "the linger did not expire"
            await asyncio.sleep(0.05)

    with_executor(body)
    assert redis_db.dbsize() == 0


def test_remove_linked_pod_with_id(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        wrong_pod = await ex.remove_linked_pod_with_id(NS, UID, SVC, -1, 4)
        unchanged = (await ex.get_linked_pod_if_persist(NS, UID, SVC), await ex.get_link_service(NS, UID))
        right_pod = await ex.remove_linked_pod_with_id(NS, UID, SVC, 30, 3)
        no_link = await ex.remove_linked_pod_with_id(NS, "bob", SVC, -1, 3)
        return wrong_pod, unchanged, right_pod, no_link

    assert with_executor(body) == (False, (3, {SVC: 3}), True, False)
    assert keys_and_types(redis_db) == {LINK: "string"}
    assert 29_000 < redis_db.pttl(LINK) <= 30_000


def test_batch_get_linked_pod_groups_by_pod_in_input_order(with_executor: ExecutorRun) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, "c", SVC, 3, -1)
        await ex.set_linked_pod(NS, "a", SVC, 3, 60)  # temporary links count as links
        await ex.set_linked_pod(NS, "b", SVC, 5, -1)
        await ex.set_linked_pod(NS, "x", "chat", 5, -1)  # another service: x is unlinked here
        return (await ex.batch_get_linked_pod(NS, ["c", "x", "b", "a", "c", "nobody"], SVC),
                await ex.batch_get_linked_pod(NS, [], SVC))

    grouped, empty = with_executor(body)
    assert grouped == {3: ["c", "a"], 5: ["b"]}
    assert empty == {}


def test_get_link_service_lists_persistent_links_only(with_executor: ExecutorRun) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        await ex.set_linked_pod(NS, UID, "chat", 0, -1)
        await ex.set_linked_pod(NS, UID, "voice", 7, 60)
        await ex.set_linked_pod(NS, "bob", "trade", 8, -1)
        return await ex.get_link_service(NS, UID), await ex.get_link_service(NS, "nobody")

    assert with_executor(body) == ({SVC: 3, "chat": 0}, {})


# --- compatibility with the other executors' data ----------------------------------------------


def test_data_written_by_plain_redis_commands_in_the_shared_layout(with_executor: ExecutorRun,
                                                                  redis_db: redis.Redis) -> None:
    # What the Go executor leaves behind, written here command by command.
    redis_db.hset("sf:{shop:state:cart}", mapping={"0": "Ready", "1": "Starting"})
    redis_db.set("sf:{shop:workload:cart}", "Serving")
    redis_db.set("sf:{shop:lk:user 1}cart", "1")
    redis_db.hset("sf:{shop:lk:user 1}", "cart", "1")
    redis_db.set("sf:{shop:lk:user 1}pay", "0", ex=100)
    redis_db.set("sf:{shop:lk:u:2}cart", "0")
    redis_db.hset("sf:{shop:lk:u:2}", "cart", "0")

    async def body(ex: Executor) -> Any:
        return (
            await ex.get_service_state("shop", "cart"),
            await ex.get_workload_state("shop", "cart"),
            await ex.get_workload_state_batch("shop", ["cart"]),
            await ex.get_linked_pod("shop", "user 1", "cart"),
            await ex.get_linked_pod_if_persist("shop", "user 1", "cart"),
            await ex.get_linked_pod_if_persist("shop", "user 1", "pay"),
            await ex.get_linked_pod("shop", "user 1", "pay"),
            await ex.batch_get_linked_pod("shop", ["user 1", "u:2"], "cart"),
            await ex.get_link_service("shop", "user 1"),
            await ex.try_set_linked_pod("shop", "u:2", "cart", 1, -1),
            await ex.remove_linked_pod_with_id("shop", "user 1", "cart", -1, 1),
        )

    assert with_executor(body) == (
        {0: "Ready", 1: "Starting"}, "Serving", {"cart": "Serving"}, 1, 1, None, 0,
        {1: ["user 1"], 0: ["u:2"]}, {"cart": 1}, (False, 0), True,
    )
    assert redis_db.hgetall("sf:{shop:lk:user 1}") == {}
    assert redis_db.get("sf:{shop:lk:user 1}pay") == "0"


def test_key_prefix_is_configurable(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    redis_db.set("sf:{game:lk:alice}lobby", "9")  # another deployment's data under the default prefix

    async def body(ex: Executor) -> Any:
        before = await ex.get_linked_pod(NS, UID, SVC)
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        await ex.set_service_state(NS, SVC, 3, "Ready")
        await ex.set_workload_state(NS, SVC, "Serving")
        return before, await ex.get_linked_pod(NS, UID, SVC)

    assert with_executor(body, key_prefix="tenant7") == (None, 3)
    assert keys_and_types(redis_db) == {
        "sf:{game:lk:alice}lobby": "string",
        "tenant7:{game:lk:alice}": "hash",
        "tenant7:{game:lk:alice}lobby": "string",
        "tenant7:{game:state:lobby}": "hash",
        "tenant7:{game:workload:lobby}": "string",
    }
    assert redis_db.get("sf:{game:lk:alice}lobby") == "9"


# --- atomicity, script loading ----------------------------------------------------------------


def test_concurrent_set_if_absent_agree_on_one_pod(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        return await asyncio.gather(*(ex.set_linked_pod_if_absent(NS, UID, SVC, pod, -1) for pod in range(200)))

    results = with_executor(body)
    assert len(set(results)) == 1
    assert redis_db.get(LINK) == str(results[0])
    assert redis_db.hgetall(HASH) == {SVC: str(results[0])}


def test_scripts_flushed_from_redis_are_reloaded_invisibly(with_executor: ExecutorRun,
                                                           redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> Any:
        await ex.set_linked_pod(NS, UID, SVC, 3, -1)
        redis_db.script_flush()
        # Every script kind, concurrently: each NOSCRIPT is answered by a reload and one retry.
        results = await asyncio.gather(
            ex.set_linked_pod(NS, UID, SVC, 4, -1),
            ex.get_linked_pod_if_persist(NS, "bob", SVC),
            ex.try_set_linked_pod(NS, "carol", SVC, 1, -1),
        )
        redis_db.script_flush()
        return results, await ex.remove_linked_pod(NS, UID, SVC, -1), ex.script_reloads

    results, removed, reloads = with_executor(body)
    assert results == [3, None, (True, 1)]
    assert removed is True
    assert reloads >= 4
    assert redis_db.get(LINK) is None


# --- over the wire, through the daemon -----------------------------------------------------------


def test_end_to_end_through_the_daemon(daemon: Daemon, redis_db: redis.Redis) -> None:
    def call(method: str, *params: Any) -> Any:
        error, result = rpc_call(daemon.socket_path, method, list(params))
        assert error is None, (method, error)
        return result

    assert call("set_linked_pod", NS, UID, SVC, 3, -1) is None
    assert call("try_set_linked_pod", NS, UID, SVC, 4, 60) == [False, 3]  # an array on the wire
    assert call("set_linked_pod_if_absent", NS, "bob", SVC, 5, 60) == 5
    assert call("batch_get_linked_pod", NS, ["bob", "nobody", UID], SVC) == {3: [UID], 5: ["bob"]}
    assert call("get_link_service", NS, UID) == {SVC: 3}
    assert keys_and_types(redis_db) == {HASH: "hash", LINK: "string", "sf:{game:lk:bob}lobby": "string"}
    assert redis_db.ttl(LINK) == -1 and 59 <= redis_db.ttl("sf:{game:lk:bob}lobby") <= 60

    assert call("remove_linked_pod", NS, UID, SVC, 5) is True
    assert call("get_linked_pod", NS, UID, SVC) == 3
    assert call("get_linked_pod_if_persist", NS, UID, SVC) is None
    assert keys_and_types(redis_db) == {LINK: "string", "sf:{game:lk:bob}lobby": "string"}
    assert 4_000 < redis_db.pttl(LINK) <= 5_000

    assert call("set_service_state", NS, SVC, 3, "Ready") is None
    assert call("set_workload_state", NS, SVC, "Serving") is None
    assert call("get_service_state", NS, SVC) == {3: "Ready"}
    assert call("get_workload_state_batch", NS, [SVC, "chat"]) == {SVC: "Serving"}


def test_scripts_flushed_from_redis_are_reloaded_invisibly_over_the_wire(daemon: Daemon,
                                                                         redis_db: redis.Redis) -> None:
    # Every script once after a SCRIPT FLUSH, through the daemon: no caller sees NOSCRIPT.
    calls: list[tuple[str, list[Any], Any]] = [
        ("set_service_state", [NS, SVC, 1, "Ready"], None),
        ("report_pod_load", [NS, SVC, 1, 0], None),
        ("compute_linked_pod", [NS, "carol", SVC, -1], 1),
        ("set_linked_pod", [NS, UID, SVC, 3, -1], None),
        ("try_set_linked_pod", [NS, UID, SVC, 4, -1], [False, 3]),
        ("set_linked_pod_if_absent", [NS, UID, SVC, 4, -1], 3),
        ("get_linked_pod_if_persist", [NS, UID, SVC], 3),
        ("remove_linked_pod_with_id", [NS, UID, SVC, -1, 4], False),
        ("remove_linked_pod", [NS, UID, SVC, -1], True),
    ]
    for method, params, expected in calls:
        redis_db.script_flush()
        assert rpc_call(daemon.socket_path, method, params) == (None, expected), method
    assert keys_and_types(redis_db) == {"sf:{game:state:lobby}": "hash", "sf:{game:state:lobby}load": "hash",
                                        "sf:{game:lk:carol}": "hash", "sf:{game:lk:carol}lobby": "string"}


# --- errors ----------------------------------------------------------------------------------


def test_redis_errors_are_internal_and_do_not_echo_user_data(with_executor: ExecutorRun,
                                                             redis_db: redis.Redis) -> None:
    uid = "secret-user-4711"
    redis_db.set(f"sf:{{game:lk:{uid}}}", "not a hash")  # another tool's key of the wrong type
    redis_db.set("sf:{game:state:lobby}", "not a hash")
    redis_db.set(f"sf:{{game:lk:{uid}}}chat", "garbage-4712")

    async def body(ex: Executor) -> list[RpcError]:
        calls = [
            ex.set_linked_pod(NS, uid, SVC, 3, -1),
            ex.get_link_service(NS, uid),
            ex.get_service_state(NS, SVC),
            ex.get_linked_pod(NS, uid, "chat"),
        ]
        errors = []
        for call in calls:
            with pytest.raises(RpcError) as info:
                await call
            errors.append(info.value)
        return errors

    for error in with_executor(body):
        assert error.code == "INTERNAL"
        assert uid not in error.message and "4712" not in error.message, error.message


def test_connect_gives_up_with_unavailable_after_the_startup_timeout() -> None:
    config = Config(redis_url="unix:///nonexistent/redis.sock", startup_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        run_async(lambda: Executor.connect(config))
    assert time.monotonic() - started < 3


def test_connect_honours_username_and_password() -> None:
    # A second ACL user beside the default one (the fixture's readiness probe uses the default).
    with running(RedisServer(extra_args=["--user", "alice", "on", ">s3cret", "~*", "&*", "+@all"])) as server:
        good = Config(redis_url=server.url, redis_username="alice", redis_password="s3cret", startup_timeout_s=5)
        bad = Config(redis_url=server.url, redis_username="alice", redis_password="wrong", startup_timeout_s=0.3)

        async def use(config: Config) -> Any:
            ex = await Executor.connect(config)
            try:
                await ex.set_workload_state(NS, SVC, "Serving")
                return await ex.health()
            finally:
                await ex.close()

        assert run_async(lambda: use(good)) == {"ready": True, "redis": "ok"}
        assert server.client().get("sf:{game:workload:lobby}") == "Serving"
        with pytest.raises(Unavailable):
            run_async(lambda: use(bad))


def test_a_dead_redis_is_unavailable_fast_and_unhealthy() -> None:
    with running(RedisServer()) as server:
        async def body() -> Any:
            ex = await Executor.connect(Config(redis_url=server.url, startup_timeout_s=5))
            try:
                await ex.set_linked_pod(NS, UID, SVC, 3, -1)
                server.kill()
                for _ in range(3):  # the lost connection, then each reconnect attempt
                    started = time.monotonic()
                    with pytest.raises(Unavailable):
                        await ex.get_linked_pod(NS, UID, SVC)
                    assert time.monotonic() - started < 0.5
                health = await ex.health()
            finally:
                await ex.close()
            return health

        health = run_async(body)
        assert health["ready"] is False and health["redis"].startswith("unreachable")


def test_a_hung_redis_leaves_health_bounded_and_no_stale_reply_after_cancel() -> None:
    with running(RedisServer()) as server:
        async def body() -> Any:
            ex = await Executor.connect(Config(redis_url=server.url, startup_timeout_s=5))
            try:
                await ex.set_linked_pod(NS, "one", SVC, 1, -1)
                await ex.set_linked_pod(NS, "two", SVC, 2, -1)
                with server.paused():
                    with pytest.raises(TimeoutError):  # what the server's deadline does to a call
                        async with asyncio.timeout(0.2):
                            await ex.get_linked_pod(NS, "one", SVC)
                    started = time.monotonic()
                    health = await ex.health()
                    health_s = time.monotonic() - started
                # The cancelled call's reply arrives now; it must not answer this call.
                answer = await ex.get_linked_pod(NS, "two", SVC)
                return health, health_s, answer, await ex.health()
            finally:
                await ex.close()

        health, health_s, answer, later = run_async(body)
        assert health["ready"] is False and health_s < 1.5
        assert answer == 2
        assert later == {"ready": True, "redis": "ok"}


def _make_tls_files(directory: Path) -> dict[str, str]:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {name: str(directory / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt",
                                                       "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_rediss_uses_the_configured_ca_and_client_certificate(tmp_path: Path) -> None:
    files = _make_tls_files(tmp_path)
    port = free_port()
    tls_args = ["--tls-port", str(port), "--tls-cert-file", files["server.crt"], "--tls-key-file",
                files["server.key"], "--tls-ca-cert-file", files["ca.crt"], "--tls-auth-clients", "yes"]
    with running(RedisServer(extra_args=tls_args)) as server:
        url = f"rediss://127.0.0.1:{port}"
        good = Config(redis_url=url, redis_tls_ca_file=files["ca.crt"], redis_tls_cert_file=files["client.crt"],
                      redis_tls_key_file=files["client.key"], startup_timeout_s=5)

        async def use(config: Config) -> Any:
            ex = await Executor.connect(config)
            try:
                await ex.set_linked_pod(NS, UID, SVC, 3, -1)
                return await ex.get_linked_pod(NS, UID, SVC)
            finally:
                await ex.close()

        assert run_async(lambda: use(good)) == 3
        assert server.client().get(LINK) == "3"
        # Without the client certificate the server refuses the handshake.
        no_client_cert = Config(redis_url=url, redis_tls_ca_file=files["ca.crt"], startup_timeout_s=0.3)
        with pytest.raises(Unavailable):
            run_async(lambda: use(no_client_cert))


# --- writes that are all or nothing, and one reading of a pod id --------------------------------------


def link_state(r: redis.Redis) -> dict[str, Any]:
    """Every key of the test with its type, value and TTL."""
    state: dict[str, Any] = {}
    for key in sorted(map(str, r.keys("*"))):
        kind = r.type(key)
        state[key] = (kind, r.hgetall(key) if kind == "hash" else r.get(key), r.ttl(key))
    return state


LINK_WRITES = [
    ("set_linked_pod", lambda ex: ex.set_linked_pod(NS, UID, SVC, 3, -1)),
    ("set_linked_pod temporary", lambda ex: ex.set_linked_pod(NS, UID, SVC, 3, 60)),
    ("try_set_linked_pod", lambda ex: ex.try_set_linked_pod(NS, UID, SVC, 3, -1)),
    ("set_linked_pod_if_absent", lambda ex: ex.set_linked_pod_if_absent(NS, UID, SVC, 3, -1)),
    ("remove_linked_pod", lambda ex: ex.remove_linked_pod(NS, UID, SVC, -1)),
    ("remove_linked_pod linger", lambda ex: ex.remove_linked_pod(NS, UID, SVC, 60)),
    ("remove_linked_pod_with_id", lambda ex: ex.remove_linked_pod_with_id(NS, UID, SVC, -1, 3)),
]


@pytest.mark.parametrize("wrong", ["hash holds a string", "link holds a hash"])
@pytest.mark.parametrize(("name", "write"), LINK_WRITES, ids=[name for name, _ in LINK_WRITES])
def test_a_link_write_over_a_key_of_the_wrong_type_fails_and_changes_nothing(
        with_executor: ExecutorRun, redis_db: redis.Redis, name: str, write: Any, wrong: str) -> None:
    if wrong == "hash holds a string":
        redis_db.set(HASH, "another tool's string")
        redis_db.set(LINK, "3" if name == "remove_linked_pod_with_id" else "5")  # the id matches: it would write
    else:
        redis_db.hset(LINK, "x", "y")
    before = link_state(redis_db)

    async def body(ex: Executor) -> RpcError:
        with pytest.raises(RpcError) as info:
            await write(ex)
        return info.value

    error = with_executor(body)
    assert error.code == "INTERNAL" and "WRONGTYPE" in error.message
    assert link_state(redis_db) == before


@pytest.mark.parametrize("stored", ["0x7", "7.0", " 7", "7e0", "+7", "-7", "2147483648"])
def test_a_value_that_looks_like_a_number_is_no_pod_id_anywhere(with_executor: ExecutorRun, redis_db: redis.Redis,
                                                                  stored: str) -> None:
    # What Lua's tonumber reads as 7 (or a number) is still no pod id: the scripts and the reads agree.
    redis_db.set(LINK, stored)
    redis_db.hset(HASH, SVC, stored)
    before = link_state(redis_db)

    async def body(ex: Executor) -> list[Any]:
        outcomes: list[Any] = []
        for call in (ex.get_linked_pod(NS, UID, SVC), ex.try_set_linked_pod(NS, UID, SVC, 7, -1)):
            with pytest.raises(Internal):
                await call
        outcomes.append(await ex.remove_linked_pod_with_id(NS, UID, SVC, -1, 7))
        outcomes.append(await ex.get_link_service(NS, UID))
        return outcomes

    assert with_executor(body) == [False, {}]
    assert link_state(redis_db) == before


def test_leading_zeros_are_still_the_pod(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    redis_db.set(LINK, "007")
    redis_db.hset(HASH, SVC, "007")

    async def body(ex: Executor) -> list[Any]:
        return [await ex.get_linked_pod(NS, UID, SVC), await ex.try_set_linked_pod(NS, UID, SVC, 7, -1),
                await ex.remove_linked_pod_with_id(NS, UID, SVC, -1, 7)]

    assert with_executor(body) == [7, (True, 7), True]
    assert not redis_db.exists(LINK, HASH)
