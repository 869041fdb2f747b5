"""The wire protocol, spoken with msgpack and a raw socket (not through statefuld_client).

Whatever another language's MessagePack-RPC client would rely on: replies matched by msgid,
notifications, each error code, and the cases that close one connection and only that one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import redis
from support import NS, SVC, Daemon, RawClient, RedisServer, free_port, in_flight, link_key, rpc_call, running, wait_for

Raw = Callable[..., RawClient]


@pytest.fixture
def conn(daemon: Daemon, raw: Raw) -> RawClient:
    return raw(daemon.socket_path)


# --- requests and replies --------------------------------------------------------------------


def test_pipelined_requests_are_each_answered_once_by_msgid(conn: RawClient, redis_db: redis.Redis) -> None:
    count = 200
    conn.send(*[[0, 1000 + i, "set_linked_pod", [NS, f"user{i}", SVC, i, -1]] for i in range(count)])
    replies = conn.replies(count)
    assert set(replies) == {1000 + i for i in range(count)}
    assert all(error is None and result is None for error, result in replies.values())
    # The replies name the right request: each get returns its own user's pod.
    conn.send(*[[0, i, "get_linked_pod", [NS, f"user{i}", SVC]] for i in range(count)])
    assert conn.replies(count) == {i: (None, i) for i in range(count)}
    assert redis_db.get(link_key("user7")) == "7"


def test_msgid_may_be_any_uint32(conn: RawClient) -> None:
    assert conn.call(0, "ping", []) == (None, "PONG")
    assert conn.call(2**32 - 1, "ping", []) == (None, "PONG")


def test_many_small_requests_in_one_write_are_all_answered(conn: RawClient) -> None:
    # ~100 KiB of requests arrive in reads larger than the unpacker's feed slice: none may be
    # lost or trip the message-size limit. More than --max-in-flight, but ping is never shed.
    count = 10_000
    conn.send_bytes(b"".join(msgpack.packb([0, i, "ping", []]) for i in range(count)))
    assert conn.replies(count) == {i: (None, "PONG") for i in range(count)}


def test_a_message_just_under_the_limit_is_accepted(conn: RawClient) -> None:
    big_uid = "u" * (1024 * 1024 - 100)  # the whole message stays under the 1 MiB default
    error, _ = conn.call(1, "get_linked_pod", [NS, big_uid, SVC])
    assert error["code"] == "INVALID_ARGUMENT" and "uid" in error["message"]
    assert conn.call(2, "ping", []) == (None, "PONG")  # same connection, still open


def test_notification_is_executed_and_never_answered(conn: RawClient, redis_db: redis.Redis) -> None:
    conn.send([2, "set_service_state", [NS, SVC, 4, "Ready"]], [0, 9, "ping", []])
    assert conn.replies(1) == {9: (None, "PONG")}
    wait_for(lambda: redis_db.hget(f"sf:{{{NS}:state:{SVC}}}", "4") == "Ready", timeout_s=5, what="notification")
    # A failing notification is not answered either, and the connection stays usable.
    conn.send([2, "set_service_state", [NS, SVC, "not-a-pod", "Ready"]], [2, "no_such_method", []])
    assert conn.call(10, "ping", []) == (None, "PONG")


# --- error codes -----------------------------------------------------------------------------


def test_invalid_argument_names_the_parameter_and_writes_nothing(conn: RawClient, redis_db: redis.Redis) -> None:
    error, result = conn.call(1, "set_linked_pod", [NS, "alice", SVC, "three", -1])
    assert result is None
    assert error["code"] == "INVALID_ARGUMENT" and "pod_id" in error["message"]
    error, _ = conn.call(2, "set_linked_pod", [NS, "alice", SVC])  # wrong arity
    assert error["code"] == "INVALID_ARGUMENT"
    assert redis_db.dbsize() == 0


def test_unknown_method(conn: RawClient) -> None:
    error, result = conn.call(1, "drop_everything", [])
    assert (error["code"], result) == ("UNKNOWN_METHOD", None)
    assert "drop_everything" in error["message"]


def test_internal_error_on_a_key_of_the_wrong_type(conn: RawClient, redis_db: redis.Redis) -> None:
    redis_db.set(f"sf:{{{NS}:state:{SVC}}}", "not a hash")  # WRONGTYPE for the executor's HGETALL
    error, result = conn.call(1, "get_service_state", [NS, SVC])
    assert (error["code"], result) == ("INTERNAL", None)
    assert isinstance(error["message"], str)
    assert conn.call(2, "ping", []) == (None, "PONG")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running(RedisServer()) as server:
        yield server


def test_unavailable_is_fast_when_redis_is_down(own_redis: RedisServer, start: Callable[[Daemon], Daemon]) -> None:
    daemon = start(Daemon(own_redis.url, args=["--request-timeout-ms", "5000"]))
    own_redis.stop()
    started = time.monotonic()
    error, _ = rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC])
    assert error["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 2.0  # fast, well before the 5 s deadline
    assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")  # alive without Redis


def test_unavailable_before_the_deadline_when_redis_host_does_not_answer() -> None:
    # Redis's address stops answering at all (a host gone from the network): the daemon's
    # reconnect gets no SYN-ACK. A listener that never accepts, its one-slot backlog filled,
    # makes the kernel drop further SYNs the same way. The caller must hear UNAVAILABLE once
    # the connect timeout (1 s) passes, not wait out the 2 s deadline for a TIMEOUT.
    port = free_port()
    with running(RedisServer(port=port)) as server, running(Daemon(server.tcp_url)) as daemon:
        server.stop()
        with socket.socket() as silent, socket.socket() as filler:
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            silent.bind(("127.0.0.1", port))
            silent.listen(0)
            filler.connect(("127.0.0.1", port))  # the backlog's one slot
            started = time.monotonic()
            error, _ = rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC])
            elapsed = time.monotonic() - started
        assert error["code"] == "UNAVAILABLE", error
        assert elapsed < 1.8, f"answered after {elapsed:.2f}s"
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")


def test_timeout_when_redis_hangs(own_redis: RedisServer) -> None:
    with running(Daemon(own_redis.url, args=["--request-timeout-ms", "300"])) as daemon:
        with own_redis.paused():
            started = time.monotonic()
            error, _ = rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC])
            elapsed = time.monotonic() - started
        assert error["code"] == "TIMEOUT"
        assert 0.25 < elapsed < 2.0
        # Redis back: the daemon recovers.
        wait_for(lambda: rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC]) == (None, None),
                 timeout_s=10, what="recovery after the timeout")


def test_overloaded_past_max_in_flight_without_queueing(own_redis: RedisServer, start: Callable[[Daemon], Daemon],
                                                        raw: Raw) -> None:
    args = ["--max-in-flight", "2", "--request-timeout-ms", "10000"]
    daemon = start(Daemon(own_redis.url, args=args))
    c = raw(daemon.socket_path)
    with own_redis.paused():
        c.request(1, "get_linked_pod", [NS, "a", SVC])
        c.request(2, "get_linked_pod", [NS, "b", SVC])
        wait_for(lambda: in_flight(daemon.socket_path) == 2, what="both calls in flight")
        started = time.monotonic()
        c.request(3, "get_linked_pod", [NS, "c", SVC])
        error, _ = c.replies(1)[3]
        assert error["code"] == "OVERLOADED"
        assert time.monotonic() - started < 1.0  # shed at once, not after a wait
    # The two requests in flight complete normally once Redis answers.
    assert c.replies(2) == {1: (None, None), 2: (None, None)}
    assert c.call(4, "get_linked_pod", [NS, "d", SVC]) == (None, None)


def test_a_connection_past_its_own_limit_waits_and_leaves_the_budget_to_others(
        own_redis: RedisServer, start: Callable[[Daemon], Daemon], raw: Raw) -> None:
    # 60 pipelined requests on one connection against a daemon-wide budget of 16: without a
    # per-connection bound they would take all 16 slots and the rest of them, and everybody
    # else's, would be OVERLOADED. With it the connection runs 4 at a time and simply waits.
    args = ["--max-in-flight", "16", "--max-in-flight-per-connection", "4", "--request-timeout-ms", "10000"]
    daemon = start(Daemon(own_redis.url, args=args))
    hog, bystander = raw(daemon.socket_path), raw(daemon.socket_path)
    with own_redis.paused():
        hog.send(*[[0, i, "get_linked_pod", [NS, f"hog{i}", SVC]] for i in range(60)])
        bystander.send(*[[0, i, "get_linked_pod", [NS, f"by{i}", SVC]] for i in range(3)])
        # Once everything sent has been read: the hog's 4, the bystander's 3.
        wait_for(lambda: in_flight(daemon.socket_path) >= 7, what="the sent calls in flight")
        assert in_flight(daemon.socket_path) == 7
    assert bystander.replies(3) == {i: (None, None) for i in range(3)}
    assert hog.replies(60) == {i: (None, None) for i in range(60)}
    # A held connection takes requests again as its calls end: a late request is served too.
    assert hog.call(99, "get_linked_pod", [NS, "late", SVC]) == (None, None)


def test_requests_held_back_from_a_peer_that_left_are_never_run(
        own_redis: RedisServer, start: Callable[[Daemon], Daemon], raw: Raw) -> None:
    args = ["--max-in-flight-per-connection", "4", "--request-timeout-ms", "10000"]
    daemon = start(Daemon(own_redis.url, args=args))
    hog, observer = raw(daemon.socket_path), raw(daemon.socket_path)
    with own_redis.paused():
        hog.send(*[[0, i, "set_linked_pod", [NS, f"gone{i}", SVC, 1, -1]] for i in range(60)])
        wait_for(lambda: in_flight(daemon.socket_path) == 4, what="the 4 calls taken")
        hog.close()  # 4 taken (sent to the paused Redis), 56 still held back
    client = own_redis.client()
    wait_for(lambda: len(client.keys(link_key("gone*"))) >= 4, timeout_s=5, what="the 4 taken calls")
    # A write sent after those four is run after anything the daemon might still take from the
    # hog: once it is answered, a held call that ran would show.
    assert observer.call(1, "set_linked_pod", [NS, "marker", SVC, 1, -1]) == (None, None)
    assert len(client.keys(link_key("gone*"))) == 4


# --- connections closed for protocol violations ------------------------------------------------

MALFORMED = {
    "garbage": b"\xc1\xc1\xc1\xc1",  # 0xc1 is never used in MessagePack
    "not an array": msgpack.packb({"method": "ping"}),
    "wrong arity": msgpack.packb([0, 1, "ping"]),
    "unknown type": msgpack.packb([5, 1, "ping", []]),
    "response sent to the daemon": msgpack.packb([1, 1, None, "PONG"]),
    "msgid not an int": msgpack.packb([0, "1", "ping", []]),
    "negative msgid": msgpack.packb([0, -1, "ping", []]),
    "method not a string": msgpack.packb([0, 1, 42, []]),
    "params not an array": msgpack.packb([0, 1, "ping", {"a": 1}]),
    "oversized": msgpack.packb([0, 1, "ping", ["x" * (1024 * 1024 + 1)]]),
    "oversized in small pieces": msgpack.packb([0, 1, "ping", list(range(300_000))]),
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_closes_only_that_connection(daemon: Daemon, payload: bytes, raw: Raw) -> None:
    bystander, offender = raw(daemon.socket_path), raw(daemon.socket_path)
    assert bystander.call(1, "ping", []) == (None, "PONG")
    try:
        offender.send_bytes(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending the oversized one: also a close
    else:
        assert offender.closed_by_peer()
    assert bystander.call(2, "ping", []) == (None, "PONG")
    assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")


def test_a_malformed_message_after_answered_calls_closes_the_connection(conn: RawClient) -> None:
    assert conn.call(1, "ping", []) == (None, "PONG")
    conn.send_bytes(b"\xc1")
    assert conn.closed_by_peer()


def test_a_peer_that_stops_sending_still_gets_its_replies(conn: RawClient) -> None:
    # As `socat` or a client that half-closes after its last request: replies still arrive,
    # then the daemon closes the connection.
    conn.send(*[[0, i, "get_linked_pod", [NS, f"user{i}", SVC]] for i in range(20)])
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.replies(20) == {i: (None, None) for i in range(20)}
    assert conn.closed_by_peer()


# Run by a system Python as another user: no msgpack there, so the bytes are spelled out.
_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    print(s.recv(100).hex() or "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""
_SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(_SYSTEM_PYTHON, os.X_OK),
                    reason="needs root and a system python3 to connect as another user")
def test_peers_outside_the_allow_lists_are_disconnected(redis_server: RedisServer) -> None:
    nobody = 65534

    def ping_as_nobody(socket_path: str) -> str:
        ping = msgpack.packb([0, 1, "ping", []]).hex()
        done = subprocess.run([_SYSTEM_PYTHON, "-c", _AS_NOBODY, socket_path, ping], user=nobody, group=nobody,
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        out = done.stdout.strip()
        return out if out == "closed" else msgpack.unpackb(bytes.fromhex(out))[3]

    for allowed, expected in (("1", "closed"), (str(nobody), "PONG")):
        daemon = Daemon(redis_server.url, args=["--allow-uid", allowed, "--socket-mode", "0666"])
        os.chmod(daemon.dir, 0o711)  # let nobody reach the socket; the allow list is what decides
        with running(daemon):
            assert ping_as_nobody(daemon.socket_path) == expected
            assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")  # the daemon's own uid


# --- what common msgpack-rpc clients send ----------------------------------------------------------


def test_nil_params_are_read_as_no_arguments(conn: RawClient, redis_db: redis.Redis) -> None:
    conn.send([0, 1, "ping", None], [2, "ping", None])
    assert conn.replies(1) == {1: (None, "PONG")}
    error, _ = conn.call(2, "get_linked_pod", None)  # nil for a method that takes arguments: its arity error
    assert error["code"] == "INVALID_ARGUMENT" and "get_linked_pod takes 3 params" in error["message"]


@pytest.mark.parametrize("msgid", [0.0, 7.0, 2.0**31, 2.0**32 - 1])
def test_a_whole_number_float_msgid_is_answered_as_an_integer(conn: RawClient, msgid: float) -> None:
    conn.send([0, msgid, "ping", []])
    message = next(conn.messages())
    assert message == [1, int(msgid), None, "PONG"] and type(message[1]) is int


@pytest.mark.parametrize("msgid", [1.5, -1.0, 2.0**32, float("nan"), float("inf")])
def test_a_float_msgid_that_is_no_uint32_closes_the_connection(conn: RawClient, msgid: float) -> None:
    conn.send([0, msgid, "ping", []])
    assert conn.closed_by_peer()


def test_errors_as_strings_for_this_connection_only(conn: RawClient, daemon: Daemon, raw: Raw) -> None:
    assert conn.call(1, "set_error_format", ["string"]) == (None, None)
    assert conn.call(2, "get_linked_pod", [NS, "bad{uid", SVC]) == (
        "INVALID_ARGUMENT: uid must not contain '{', '}' or control characters", None)
    assert conn.call(3, "no_such_method", []) == ("UNKNOWN_METHOD: unknown method 'no_such_method'", None)
    other = raw(daemon.socket_path)  # another connection keeps the map
    assert other.call(1, "no_such_method", []) == (
        {"code": "UNKNOWN_METHOD", "message": "unknown method 'no_such_method'"}, None)
    assert conn.call(4, "set_error_format", ["map"]) == (None, None)
    assert conn.call(5, "no_such_method", [])[0]["code"] == "UNKNOWN_METHOD"
    error, _ = conn.call(6, "set_error_format", ["xml"])
    assert error["code"] == "INVALID_ARGUMENT" and error["message"].startswith("format must be")
