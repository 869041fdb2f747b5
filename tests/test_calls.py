"""The daemon's hot path (get_linked_pod, set_linked_pod answered from the Redis reply's future,
no Task per request) keeps the protocol's guarantees: one reply per request, TIMEOUT after the
deadline even when Redis answers later, each request of a pipelined batch with its own error,
NOSCRIPT recovered, notifications executed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Daemon, RedisServer, running, wait_for
from test_protocol import RawConnection, link_key

from statefuld.protocol import encode_small_reply

NS, SVC = "game", "lobby"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running(RedisServer()) as server:
        yield server


def _nothing_more(conn: RawConnection, wait_s: float) -> bool:
    """True if no further message arrives within wait_s."""
    conn.sock.settimeout(wait_s)
    try:
        data = conn.sock.recv(1 << 16)
    except TimeoutError:
        return True
    conn.unpacker.feed(data)
    return not list(conn.unpacker)


def test_a_reply_after_the_deadline_gets_exactly_one_timeout(own_redis: RedisServer) -> None:
    with running(Daemon(own_redis.url, args=["--request-timeout-ms", "300"])) as daemon:
        own_redis.client().set(link_key("bob"), "7")
        c = RawConnection(daemon.socket_path)
        with own_redis.paused():  # Redis answers all three once resumed: late
            c.send(
                [0, 1, "get_linked_pod", [NS, "alice", SVC]],  # hot path: the mux future
                [0, 2, "set_linked_pod", [NS, "carol", SVC, 4, -1]],  # hot path: a script
                [0, 3, "get_link_service", [NS, "alice"]],  # the Task path
            )
            started = time.monotonic()
            replies = c.replies(3)
            elapsed = time.monotonic() - started
        assert {msgid: error["code"] for msgid, (error, _) in replies.items()} == {1: "TIMEOUT", 2: "TIMEOUT",
                                                                                    3: "TIMEOUT"}
        assert 0.25 < elapsed < 2.0
        assert _nothing_more(c, 0.5)  # the late replies are dropped, not sent as second answers
        # ... and not handed to later requests: each gets its own key's answer.
        c.sock.settimeout(5.0)
        assert c.call(4, "get_linked_pod", [NS, "bob", SVC]) == (None, 7)
        assert c.call(5, "get_linked_pod", [NS, "carol", SVC]) == (None, 4)  # the late write did run
        c.close()


def test_each_request_of_a_pipelined_batch_gets_its_own_error(daemon: Daemon, redis_db: redis.Redis) -> None:
    redis_db.set(link_key("bob"), "5")
    redis_db.hset(link_key("wrong"), "x", "y")  # WRONGTYPE for GET
    c = RawConnection(daemon.socket_path)
    try:
        c.send(
            [0, 1, "get_linked_pod", [NS, "bob", SVC]],
            [0, 2, "get_linked_pod", [NS, "wrong", SVC]],
            [0, 3, "set_linked_pod", [NS, "dave", SVC, -1, -1]],
            [0, 4, "get_linked_pod", [NS, "bad{uid", SVC]],
            [0, 5, "get_linked_pod", [NS, "bob"]],
            [0, 6, "set_linked_pod", [NS, "dave", SVC, 9, 30]],
            [0, 7, "no_such_method", []],
            [0, 8, "get_linked_pod", ["bad:ns", "bob", SVC]],
            [0, 9, "ping", []],
        )
        replies = c.replies(9)
        # Not in the batch: pipelined requests may complete in any order (here the first script
        # call of the test meets NOSCRIPT and is run again after the reload).
        assert c.call(10, "get_linked_pod", [NS, "dave", SVC]) == (None, 9)
    finally:
        c.close()
    codes = {msgid: (error or {}).get("code") for msgid, (error, _) in replies.items()}
    assert codes == {1: None, 2: "INTERNAL", 3: "INVALID_ARGUMENT", 4: "INVALID_ARGUMENT", 5: "INVALID_ARGUMENT",
                     6: None, 7: "UNKNOWN_METHOD", 8: "INVALID_ARGUMENT", 9: None}
    assert (replies[1][1], replies[6][1], replies[9][1]) == (5, None, "PONG")
    assert "pod_id" in replies[3][0]["message"] and "uid" in replies[4][0]["message"]
    assert "ns" in replies[8][0]["message"]
    assert 0 < redis_db.ttl(link_key("dave")) <= 30


# Where a msgid's MessagePack form changes size, and the results around the one-byte replies.
_EDGE_MSGIDS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1]
# 1023 / 1024: the last pod id decoded by table (executor._SMALL_POD_IDS) and the first parsed.
_EDGE_PODS = [None, 0, 127, 128, 255, 1023, 1024, 65536, 2**31 - 1]


def test_replies_are_exact_at_every_msgid_and_pod_id_size(daemon: Daemon, redis_db: redis.Redis) -> None:
    for pod in _EDGE_PODS:
        if pod is not None:
            redis_db.set(link_key(f"p{pod}"), str(pod))
    c = RawConnection(daemon.socket_path)
    try:
        for msgid in _EDGE_MSGIDS:
            for pod in _EDGE_PODS:
                assert c.call(msgid, "get_linked_pod", [NS, f"p{pod}", SVC]) == (None, pod), (msgid, pod)
        # The previous pod of set_linked_pod, small and large; a result that is not an int.
        assert c.call(2**32 - 1, "set_linked_pod", [NS, "p127", SVC, 128, -1]) == (None, 127)
        assert c.call(300, "set_linked_pod", [NS, "p127", SVC, 5, -1]) == (None, 128)
        assert c.call(70000, "ping", []) == (None, "PONG")
    finally:
        c.close()


@settings(max_examples=500, deadline=None)
@given(msgid=st.one_of(st.sampled_from(_EDGE_MSGIDS), st.integers(min_value=0, max_value=2**32 - 1)),
       result=st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.text(max_size=3),
                        st.floats(allow_nan=False)))
def test_the_one_byte_replies_are_what_msgpack_encodes(msgid: int, result: Any) -> None:
    encoded = encode_small_reply(msgid, result)
    if result is None or (type(result) is int and 0 <= result < 128):
        assert encoded == msgpack.packb([1, msgid, None, result])
    else:
        assert encoded is None  # Packer.pack encodes it


def test_noscript_on_the_hot_path_reloads_and_answers(daemon: Daemon, redis_db: redis.Redis) -> None:
    c = RawConnection(daemon.socket_path)
    try:
        redis_db.script_flush()
        c.send(*[[0, i, "set_linked_pod", [NS, f"u{i}", SVC, i, -1]] for i in range(50)])
        replies = c.replies(50)
        assert all(reply == (None, None) for reply in replies.values())
        assert [int(redis_db.get(link_key(f"u{i}"))) for i in range(50)] == list(range(50))
        # Again over the existing links: the previous pod comes back.
        assert c.call(100, "set_linked_pod", [NS, "u3", SVC, 8, -1]) == (None, 3)
        # NOSCRIPT over an existing link: the full path's result is answered as it is (not decoded twice).
        redis_db.script_flush()
        assert c.call(101, "set_linked_pod", [NS, "u3", SVC, 9, -1]) == (None, 8)
    finally:
        c.close()


def test_hot_path_notification_is_executed(daemon: Daemon, redis_db: redis.Redis) -> None:
    c = RawConnection(daemon.socket_path)
    try:
        c.send_bytes(msgpack.packb([2, "set_linked_pod", [NS, "erin", SVC, 6, -1]]))
        c.send_bytes(msgpack.packb([2, "get_linked_pod", [NS, "erin", 42]]))  # invalid: logged, no reply
        wait_for(lambda: redis_db.get(link_key("erin")) in (b"6", "6"), timeout_s=5, what="the notification's write")
        assert c.call(1, "get_linked_pod", [NS, "erin", SVC]) == (None, 6)
        assert _nothing_more(c, 0.3)  # nothing for the notifications, the invalid one included
    finally:
        c.close()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_busy_polling_answers_correctly_and_never_spins_while_idle(own_redis: RedisServer) -> None:
    # --busy-poll-us trades CPU for a lone caller's latency; it must cost nothing when no call
    # is waiting for Redis, or an idle sidecar would burn its pod's CPU.
    own_redis.client().mset({link_key(f"u{i}"): i for i in range(50)})
    with running(Daemon(own_redis.url, args=["--busy-poll-us", "1000"])) as daemon:
        assert daemon.proc is not None
        conn = RawConnection(daemon.socket_path)
        for n in range(2000):
            i = n % 50
            assert conn.call(n, "get_linked_pod", [NS, f"u{i}", SVC]) == (None, i)
        assert conn.call(9999, "set_linked_pod", [NS, "u1", SVC, 7, -1]) == (None, 1)
        conn.close()
        time.sleep(0.2)
        before = _cpu_s(daemon.proc.pid)
        time.sleep(1.0)
        assert _cpu_s(daemon.proc.pid) - before < 0.05  # ticks of 10 ms: a spinning loop shows 1 s
