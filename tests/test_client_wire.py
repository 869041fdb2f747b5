"""The client's sans-I/O core and API surface: no daemon, no socket."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import subprocess
import sys

import msgpack
import pytest
from support import CONTRACT_METHODS, REPO

import statefuld_client
from statefuld_client import AsyncClient, Client, errors
from statefuld_client._core import READ_METHODS, Decoder, Encoder, as_list, linked_pair, server_error, unwrap

SPEC_METHODS = {
    # unwatch acts on the connection that watches: the client's watch iterators own theirs and
    # close it instead.
    **{method: params for method, params in CONTRACT_METHODS.items() if method != "unwatch"},
    # The client's notification forms of set_service_state and report_pod_load.
    "notify_service_state": ["ns", "service", "pod_id", "state"],
    "notify_pod_load": ["ns", "service", "pod_id", "load"],
}


def test_request_and_notification_encoding() -> None:
    encoder = Encoder()
    assert msgpack.unpackb(encoder.request(7, "get_linked_pod", ["g", "u", "s"])) == [0, 7, "get_linked_pod",
                                                                                     ["g", "u", "s"]]
    assert msgpack.unpackb(encoder.notification("set_service_state", ["g", "s", 1, "Ready"])) == [
        2, "set_service_state", ["g", "s", 1, "Ready"]]
    assert msgpack.unpackb(encoder.request(2**32 - 1, "ping", [])) == [0, 2**32 - 1, "ping", []]


def test_decoder_reassembles_replies_split_anywhere_and_keeps_int_keys() -> None:
    replies = [[1, 1, None, {3: ["a", "b"]}], [1, 2, None, "PONG"], [1, 3, {"code": "INTERNAL", "message": "x"}, None]]
    data = b"".join(msgpack.packb(r) for r in replies)
    decoder = Decoder()
    got = []
    for i in range(len(data)):  # one byte at a time: every split point
        decoder.feed(data[i:i + 1])
        while (reply := decoder.next_reply()) is not None:
            got.append(reply)
    assert got == replies
    assert decoder.next_reply() is None


def test_decoder_skips_notifications_and_rejects_garbage() -> None:
    decoder = Decoder()
    decoder.feed(msgpack.packb([2, "event", []]) + msgpack.packb([1, 5, None, 1]))
    assert decoder.next_reply() == [1, 5, None, 1]
    for bad in ([0, 1, "ping", []], [1, "x", None, None], [1, 1, None], {"a": 1}, "PONG"):
        decoder = Decoder()
        decoder.feed(msgpack.packb(bad))
        with pytest.raises(errors.ProtocolError):
            decoder.next_reply()
    decoder = Decoder()
    decoder.feed(b"\xc1")  # a byte msgpack never uses
    with pytest.raises(errors.ProtocolError):
        decoder.next_reply()


@pytest.mark.parametrize(("code", "cls"), [
    ("INVALID_ARGUMENT", errors.InvalidArgumentError),
    ("UNKNOWN_METHOD", errors.UnknownMethodError),
    ("UNAVAILABLE", errors.UnavailableError),
    ("TIMEOUT", errors.DeadlineExceededError),
    ("OVERLOADED", errors.OverloadedError),
    ("INTERNAL", errors.InternalServerError),
    ("SOMETHING_NEW", errors.ServerError),
])
def test_error_codes_map_to_classes(code: str, cls: type[errors.ServerError]) -> None:
    exc = server_error({"code": code, "message": "uid must be 1..256 bytes"})
    assert type(exc) is cls
    assert exc.code == code
    assert exc.message == "uid must be 1..256 bytes"
    assert str(exc) == f"{code}: uid must be 1..256 bytes"
    with pytest.raises(cls):
        unwrap([1, 7, {"code": code, "message": "uid must be 1..256 bytes"}, None])
    clone = pickle.loads(pickle.dumps(exc))  # crosses multiprocessing intact
    assert (type(clone), clone.code, clone.message) == (cls, code, exc.message)


def test_malformed_error_field_is_still_a_server_error() -> None:
    assert type(server_error("boom")) is errors.ServerError
    assert type(server_error({"code": 5})) is errors.ServerError
    assert server_error({"code": "INTERNAL", "message": None}).message == "None"


def test_exception_tree() -> None:
    assert issubclass(errors.DeadlineExceededError, TimeoutError)
    assert issubclass(errors.ClientTimeoutError, TimeoutError)
    for cls in (errors.TransportError, errors.SocketNotFoundError, errors.ConnectRefusedError,
                errors.ConnectionLostError):
        assert issubclass(cls, ConnectionError)
    assert issubclass(errors.ClientClosedError, RuntimeError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.StatefuldError)
        assert getattr(statefuld_client, name) is cls
        assert cls.__name__ not in ("ConnectionError", "TimeoutError")
    # OSError subclasses must not read (message, code) as (errno, strerror).
    exc = errors.DeadlineExceededError("deadline passed")
    assert exc.errno is None and str(exc) == "TIMEOUT: deadline passed"
    assert str(errors.InvalidArgumentError("bad")) == "INVALID_ARGUMENT: bad"


def test_result_helpers() -> None:
    assert unwrap([1, 7, None, {1: "Ready"}]) == {1: "Ready"}
    assert linked_pair([True, 3]) == (True, 3)
    assert linked_pair([False, 4]) == (False, 4)
    assert as_list(["a"]) == ["a"] and as_list(("a",)) == ("a",)
    assert as_list(u for u in "ab") == ["a", "b"]
    assert as_list("ab") == "ab"  # a str is not split into uids; the daemon rejects it by name


def test_reads_are_exactly_the_read_methods() -> None:
    assert {"ping", "health", "get_linked_pod", "batch_get_linked_pod", "get_link_service",
            "describe_pods"} <= READ_METHODS
    for write in ("set_linked_pod", "remove_linked_pod", "compute_linked_pod", "report_pod_load",
                  "set_service_state", "try_set_linked_pod", "set_linked_pod_if_absent", "route_user", "hold_pod"):
        assert write not in READ_METHODS


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_signatures_follow_the_spec(cls: type) -> None:
    for method, params in SPEC_METHODS.items():
        fn = getattr(cls, method)
        assert fn.__doc__ and "Example" in fn.__doc__, method
        sig = inspect.signature(fn)
        positional = [p.name for p in sig.parameters.values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"]
        assert positional == params, method
        if method in ("hold_pod", "watch_service", "watch_links"):  # a handle with a connection of its own
            assert not inspect.iscoroutinefunction(fn)
            continue
        timeout = sig.parameters["timeout_s"]
        assert timeout.kind is inspect.Parameter.KEYWORD_ONLY and timeout.default is None
        assert inspect.iscoroutinefunction(fn) is (cls is AsyncClient), method
    for method in ("call", "notify"):
        assert "timeout_s" in inspect.signature(getattr(cls, method)).parameters


def test_constructors_do_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEFULD_SOCKET", "/nonexistent/dir/statefuld.sock")
    client = Client()
    assert client.socket_path == "/nonexistent/dir/statefuld.sock" and client.timeout_s == 5.0
    assert "idle" in repr(client)
    client.close()
    aclient = AsyncClient("/x.sock", timeout_s=0.5)
    assert aclient.socket_path == "/x.sock" and aclient.timeout_s == 0.5
    asyncio.run(aclient.aclose())
    with pytest.raises(ValueError, match="timeout_s"):
        Client(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncClient(timeout_s=-1)


def test_closed_clients_refuse_calls_and_reopening() -> None:
    client = Client("/nonexistent.sock")
    client.close()
    client.close()  # idempotent
    assert client.closed and "closed" in repr(client)
    with pytest.raises(errors.ClientClosedError):
        client.ping()
    with pytest.raises(errors.ClientClosedError):
        client.notify_service_state("g", "s", 1, "Ready")
    with pytest.raises(errors.ClientClosedError), client:
        pass

    async def scenario() -> None:
        aclient = AsyncClient("/nonexistent.sock")
        async with aclient:
            pass
        assert aclient.closed
        with pytest.raises(errors.ClientClosedError):
            await aclient.ping()
        with pytest.raises(errors.ClientClosedError):
            await aclient.notify_pod_load("g", "s", 1, 5)
        with pytest.raises(errors.ClientClosedError):
            async with aclient:
                pass

    asyncio.run(scenario())


def test_sync_api_is_generated_from_async_api() -> None:
    # httpcore's unasync: one source for both flavours' methods, regenerated and checked here.
    result = subprocess.run([sys.executable, str(REPO / "client_py" / "scripts" / "unasync.py"), "--check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
