"""A call's life (calls.py), whichever way its work runs (one command answered from its reply's
future, a script, a coroutine of several steps): exactly one reply per request, TIMEOUT after the
deadline even when Redis answers later, each request of a pipelined batch with its own error,
NOSCRIPT recovered, notifications executed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import redis
from support import NS, SVC, Daemon, RawClient, RedisServer, link_key, running, wait_for

Raw = Callable[..., RawClient]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running(RedisServer()) as server:
        yield server


def test_a_reply_after_the_deadline_gets_exactly_one_timeout(own_redis: RedisServer, raw: Raw,
                                                             start: Callable[[Daemon], Daemon]) -> None:
    daemon = start(Daemon(own_redis.url, args=["--request-timeout-ms", "300"]))
    own_redis.client().set(link_key("bob"), "7")
    c = raw(daemon.socket_path)
    with own_redis.paused():  # Redis answers all four once resumed: late
        c.send(
            [0, 1, "get_linked_pod", [NS, "alice", SVC]],  # one command: the reply's future
            [0, 2, "set_linked_pod", [NS, "carol", SVC, 4, -1]],  # a script
            [0, 3, "batch_get_linked_pod", [NS, ["alice"], SVC]],  # a coroutine of its own
            [0, 4, "compute_linked_pod", [NS, "dan", SVC, -1]],  # a coroutine of several steps
        )
        started = time.monotonic()
        replies = c.replies(4)
        elapsed = time.monotonic() - started
    assert {msgid: error["code"] for msgid, (error, _) in replies.items()} == dict.fromkeys(range(1, 5), "TIMEOUT")
    assert 0.25 < elapsed < 2.0
    # The late replies are not sent as second answers, nor handed to later requests: each of
    # these gets its own key's answer.
    assert c.call(5, "get_linked_pod", [NS, "bob", SVC]) == (None, 7)
    assert c.call(6, "get_linked_pod", [NS, "carol", SVC]) == (None, 4)  # the late write did run
    assert c.nothing_more(0.3)


def test_each_request_of_a_pipelined_batch_gets_its_own_error(daemon: Daemon, redis_db: redis.Redis, raw: Raw) -> None:
    redis_db.set(link_key("bob"), "5")
    redis_db.hset(link_key("wrong"), "x", "y")  # WRONGTYPE for GET
    c = raw(daemon.socket_path)
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
    codes = {msgid: (error or {}).get("code") for msgid, (error, _) in replies.items()}
    assert codes == {1: None, 2: "INTERNAL", 3: "INVALID_ARGUMENT", 4: "INVALID_ARGUMENT", 5: "INVALID_ARGUMENT",
                     6: None, 7: "UNKNOWN_METHOD", 8: "INVALID_ARGUMENT", 9: None}
    assert (replies[1][1], replies[6][1], replies[9][1]) == (5, None, "PONG")
    assert "pod_id" in replies[3][0]["message"] and "uid" in replies[4][0]["message"]
    assert "ns" in replies[8][0]["message"]
    assert 0 < redis_db.ttl(link_key("dave")) <= 30


# Where a msgid's MessagePack form changes size, and the results around the one-byte replies.
_EDGE_MSGIDS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1]
_EDGE_PODS = [None, 0, 127, 128, 255, 1023, 1024, 65536, 2**31 - 1]


def test_replies_are_exact_at_every_msgid_and_pod_id_size(daemon: Daemon, redis_db: redis.Redis, raw: Raw) -> None:
    for pod in _EDGE_PODS:
        if pod is not None:
            redis_db.set(link_key(f"p{pod}"), str(pod))
    c = raw(daemon.socket_path)
    for msgid in _EDGE_MSGIDS:
        for pod in _EDGE_PODS:
            assert c.call(msgid, "get_linked_pod", [NS, f"p{pod}", SVC]) == (None, pod), (msgid, pod)
    # The previous pod of set_linked_pod, small and large; a result that is not an int.
    assert c.call(2**32 - 1, "set_linked_pod", [NS, "p127", SVC, 128, -1]) == (None, 127)
    assert c.call(300, "set_linked_pod", [NS, "p127", SVC, 5, -1]) == (None, 128)
    assert c.call(70000, "ping", []) == (None, "PONG")


def test_noscript_reloads_and_answers(daemon: Daemon, redis_db: redis.Redis, raw: Raw) -> None:
    c = raw(daemon.socket_path)
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


def test_a_notification_is_executed_never_answered(daemon: Daemon, redis_db: redis.Redis, raw: Raw) -> None:
    c = raw(daemon.socket_path)
    c.send_bytes(msgpack.packb([2, "set_linked_pod", [NS, "erin", SVC, 6, -1]]))
    c.send_bytes(msgpack.packb([2, "get_linked_pod", [NS, "erin", 42]]))  # invalid: logged, no reply
    wait_for(lambda: redis_db.get(link_key("erin")) in (b"6", "6"), timeout_s=5, what="the notification's write")
    assert c.call(1, "get_linked_pod", [NS, "erin", SVC]) == (None, 6)
    assert c.nothing_more(0.3)  # nothing for the notifications, the invalid one included


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_busy_polling_answers_correctly_and_never_spins_while_idle(own_redis: RedisServer, raw: Raw,
                                                                  start: Callable[[Daemon], Daemon]) -> None:
    # --busy-poll-us trades CPU for a lone caller's latency; it must cost nothing when no call
    # is waiting for Redis, or an idle sidecar would burn its pod's CPU.
    own_redis.client().mset({link_key(f"u{i}"): i for i in range(50)})
    daemon = start(Daemon(own_redis.url, args=["--busy-poll-us", "1000"]))
    assert daemon.proc is not None
    conn = raw(daemon.socket_path)
    for n in range(2000):
        i = n % 50
        assert conn.call(n, "get_linked_pod", [NS, f"u{i}", SVC]) == (None, i)
    assert conn.call(9999, "set_linked_pod", [NS, "u1", SVC, 7, -1]) == (None, 1)
    conn.close()
    # Measured over a window of idle time: the CPU the daemon burns while nothing waits.
    before = _cpu_s(daemon.proc.pid)
    time.sleep(1.0)
    assert _cpu_s(daemon.proc.pid) - before < 0.05  # ticks of 10 ms: a spinning loop shows 1 s
