"""The Python client against a real `statefuld serve` and a real Redis."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import uvloop
from support import Daemon, RedisServer, in_flight, short_tmpdir, wait_for

from statefuld_client import (
    AsyncClient,
    Client,
    ClientClosedError,
    ClientTimeoutError,
    ConnectRefusedError,
    InvalidArgumentError,
    ServerError,
    SocketNotFoundError,
    TransportError,
    UnknownMethodError,
)

Call = Callable[..., Any]


@contextlib.contextmanager
def flavour_call(flavour: str, socket_path: str, timeout_s: float = 5.0) -> Iterator[Call]:
    """``call(name, *args, **kwargs)`` running the method on a Client or an AsyncClient."""
    if flavour == "sync":
        with Client(socket_path, timeout_s=timeout_s) as client:
            yield lambda name, *args, **kwargs: getattr(client, name)(*args, **kwargs)
        return
    # Applications run the AsyncClient on asyncio's own loop and on uvloop alike.
    loop = uvloop.new_event_loop() if flavour == "async-uvloop" else asyncio.new_event_loop()
    aclient = AsyncClient(socket_path, timeout_s=timeout_s)
    try:
        yield lambda name, *args, **kwargs: loop.run_until_complete(getattr(aclient, name)(*args, **kwargs))
    finally:
        loop.run_until_complete(aclient.aclose())
        loop.close()


@contextlib.contextmanager
def stopped(daemon: Daemon) -> Iterator[None]:
    daemon.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        daemon.signal(signal.SIGCONT)


async def written(client: AsyncClient) -> None:
    """Until every call made so far has been written to the daemon (the client's queue is empty)."""
    await asyncio.sleep(0)  # the calls just made queue their requests
    while client._conn is None or client._conn._queue:
        await asyncio.sleep(0)


FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "async", "async-uvloop"])


@FLAVOURS
def test_every_method_returns_python_types(flavour: str, daemon: Daemon) -> None:
    ns = f"ns-{flavour}"
    with flavour_call(flavour, daemon.socket_path) as call:
        assert call("ping") == "PONG"
        health = call("health")
        assert health["ready"] is True and isinstance(health["redis"], str)

        assert call("set_service_state", ns, "lobby", 3, "Ready") is None
        assert call("set_service_state", ns, "lobby", 4, "Draining") is None
        states = call("get_service_state", ns, "lobby")
        assert states == {3: "Ready", 4: "Draining"} and all(type(k) is int for k in states)
        assert call("get_service_state", ns, "nothing") == {}

        assert call("set_workload_state", ns, "lobby", "Running") is None
        assert call("set_workload_state", ns, "match", "Idle") is None
        assert call("get_workload_state", ns, "lobby") == "Running"
        assert call("get_workload_state", ns, "nothing") is None
        assert call("get_workload_state_batch", ns, ["lobby", "match", "nothing"]) == {"lobby": "Running",
                                                                                       "match": "Idle"}
        assert call("get_workload_state_batch", ns, (s for s in ["match"])) == {"match": "Idle"}

        assert call("set_linked_pod", ns, "alice", "lobby", 3, -1) is None
        assert call("set_linked_pod", ns, "alice", "lobby", 3, -1) == 3
        assert call("get_linked_pod", ns, "alice", "lobby") == 3
        assert call("get_linked_pod_if_persist", ns, "alice", "lobby") == 3
        assert call("try_set_linked_pod", ns, "alice", "lobby", 4, -1) == (False, 3)
        pair = call("try_set_linked_pod", ns, "bob", "lobby", 4, 60)
        assert pair == (True, 4) and type(pair) is tuple and type(pair[0]) is bool
        assert call("get_linked_pod_if_persist", ns, "bob", "lobby") is None  # temporary
        assert call("set_linked_pod_if_absent", ns, "bob", "lobby", 5, -1) == 4
        assert call("set_linked_pod_if_absent", ns, "carol", "lobby", 5, -1) == 5
        assert call("batch_get_linked_pod", ns, ["alice", "bob", "dave", "carol"], "lobby") == {
            3: ["alice"], 4: ["bob"], 5: ["carol"]}
        assert call("get_link_service", ns, "alice") == {"lobby": 3}
        assert call("get_link_service", ns, "nobody") == {}
        assert call("call", "get_linked_pod", ns, "carol", "lobby") == 5

        assert call("remove_linked_pod_with_id", ns, "alice", "lobby", -1, 9) is False
        assert call("get_linked_pod", ns, "alice", "lobby") == 3
        assert call("remove_linked_pod_with_id", ns, "alice", "lobby", -1, 3) is True
        assert call("get_linked_pod", ns, "alice", "lobby") is None
        assert call("remove_linked_pod", ns, "bob", "lobby", -1) is True
        assert call("remove_linked_pod", ns, "bob", "lobby", -1) is False

        with pytest.raises(InvalidArgumentError, match="persist_seconds") as excinfo:
            call("set_linked_pod", ns, "alice", "lobby", 3, 0)
        assert excinfo.value.code == "INVALID_ARGUMENT"
        with pytest.raises(UnknownMethodError):
            call("call", "no_such_method")
        assert call("ping", timeout_s=1.0) == "PONG"  # the connection survived the errors


def test_docstring_examples_show_what_the_daemon_answers(daemon: Daemon) -> None:
    # An example that shows another reply than the daemon's misleads whoever matches on it.
    with Client(daemon.socket_path) as client:
        for doc in (Client.health.__doc__, AsyncClient.health.__doc__):
            example = re.search(r"-> ``(\{.*?\})``", doc or "")
            assert example is not None, doc
            assert ast.literal_eval(example.group(1)) == client.health()
        shown = re.search(r"print\(exc.code, exc.message\)\s+# (.+)", ServerError.__doc__ or "")
        assert shown is not None, ServerError.__doc__
        with pytest.raises(InvalidArgumentError) as excinfo:
            client.set_linked_pod("game", "alice", "lobby", 3, 0)  # the example's call
        assert f"{excinfo.value.code} {excinfo.value.message}" == shown.group(1)


@FLAVOURS
def test_placement_methods(flavour: str, daemon: Daemon) -> None:
    ns = f"place-{flavour}"
    with flavour_call(flavour, daemon.socket_path) as call:
        assert call("report_pod_load", ns, "lobby", 1, 10) is None
        for pod_id in (1, 2):
            call("set_service_state", ns, "lobby", pod_id, "Ready")
        call("report_pod_load", ns, "lobby", 2, 20)
        pod = call("compute_linked_pod", ns, "erin", "lobby", -1)
        assert pod in (1, 2)
        assert call("compute_linked_pod", ns, "erin", "lobby", -1) == pod
        assert call("get_linked_pod", ns, "erin", "lobby") == pod
        assert call("compute_linked_pod", ns, "erin", "nothing", -1) is None


def test_32_threads_share_one_client(daemon: Daemon) -> None:
    errors: list[BaseException] = []
    rounds = 40

    with Client(daemon.socket_path) as client:
        def worker(t: int) -> None:
            try:
                for i in range(rounds):
                    uid = f"u{t}-{i}"
                    pod_id = t * 1000 + i
                    assert client.set_linked_pod("threads", uid, "svc", pod_id, -1) is None
                    assert client.get_linked_pod("threads", uid, "svc") == pod_id
                    assert client.batch_get_linked_pod("threads", [uid, "absent"], "svc") == {pod_id: [uid]}
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors[:3]
        assert all(not thread.is_alive() for thread in threads)


def test_1000_coroutines_share_one_connection(daemon: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client:
            await client.ping()
            conn = client._conn
            n = 1000
            previous = await asyncio.gather(*(client.set_linked_pod("coro", f"u{i}", "svc", i, -1) for i in range(n)))
            assert previous == [None] * n
            pods = await asyncio.gather(*(client.get_linked_pod("coro", f"u{i}", "svc") for i in range(n)))
            assert pods == list(range(n))
            mixed = await asyncio.gather(*(
                client.try_set_linked_pod("coro", f"u{i}", "svc", i + 1, -1) if i % 2
                else client.get_link_service("coro", f"u{i}")
                for i in range(n)))
            for i, result in enumerate(mixed):
                assert result == ((False, i) if i % 2 else {"svc": i}), (i, result)
            assert conn is not None and client._conn is conn and not conn.pending

    asyncio.run(scenario())


def test_fork_child_reconnects_and_never_reads_parent_replies(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        client.set_linked_pod("fork", "parent", "svc", 1, -1)
        parent_sock = client._sock
        assert parent_sock is not None
        # Hold the lock across the fork, as a parent thread in the middle of a call would: the
        # child must not inherit it held.
        client._lock.acquire()
        pid = os.fork()
        if pid == 0:  # the child: always leave through os._exit
            code = 1
            try:
                assert client._sock is None
                for i in range(50):
                    client.set_linked_pod("fork", f"child{i}", "svc", 100 + i, -1)
                    assert client.get_linked_pod("fork", f"child{i}", "svc") == 100 + i
                assert client.get_linked_pod("fork", "parent", "svc") == 1
                code = 0
            finally:
                os._exit(code)
        client._lock.release()
        for _ in range(50):
            assert client.get_linked_pod("fork", "parent", "svc") == 1
            assert client.ping() == "PONG"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client._sock is parent_sock  # the child did not disturb the parent's connection
        assert client.get_linked_pod("fork", "child49", "svc") == 149


def _exit_after(body: Callable[[], None]) -> None:
    """In a forked child: run ``body``, then leave through os._exit (0 if it passed), never
    returning into the parent's pytest."""
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Python 3.12+ warns about any fork with threads alive; this test forks with one on purpose.
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_fork_while_another_thread_makes_the_first_connect(daemon: Daemon) -> None:
    # A client that has never connected, its lock held by another thread (as during its first
    # connect) when the process forks: the child must get a free lock, not wait for a thread it
    # does not have until every call times out.
    client = Client(daemon.socket_path, timeout_s=2.0)
    held, release = threading.Event(), threading.Event()

    def first_connect() -> None:
        with client._lock:
            held.set()
            release.wait(10)

    def child() -> None:
        assert client.ping() == "PONG"
        sock = client._sock

        def grandchild() -> None:  # the child's own fork resets the client too
            assert client._sock is None
            assert client.ping() == "PONG"

        pid = os.fork()
        if pid == 0:
            _exit_after(grandchild)
        assert _exit_code(pid) == 0
        assert client._sock is sock

    thread = threading.Thread(target=first_connect)
    thread.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:
            _exit_after(child)
    finally:
        release.set()
        thread.join(5)
    assert _exit_code(pid) == 0
    assert client.ping() == "PONG"
    client.close()


def test_every_client_is_reset_in_a_forked_child_from_its_construction() -> None:
    # Not only once connected: a fork can come while another thread's first call is between
    # connecting and recording that it did. Constructing registers (bookkeeping, no I/O).
    sync_client, async_client = Client("/nonexistent/s.sock"), AsyncClient("/nonexistent/s.sock")
    # What a first connect in progress may already have left: the parent's connection.
    sock, peer = socket.socketpair()
    sync_client._sock = sock
    parents = types.SimpleNamespace(forgotten=False)
    parents.forget = lambda: setattr(parents, "forgotten", True)
    async_client._conn = parents  # type: ignore[assignment]

    def child() -> None:
        assert sync_client._sock is None
        assert async_client._conn is None and parents.forgotten  # its socket closed, in the child only

    try:
        pid = os.fork()
        if pid == 0:
            _exit_after(child)
        assert _exit_code(pid) == 0
        assert sync_client._sock is sock and not parents.forgotten  # the parent's are untouched
    finally:
        async_client._conn = None
        sync_client.close()
        peer.close()


def test_fork_async_client(daemon: Daemon) -> None:
    loop = asyncio.new_event_loop()
    client = AsyncClient(daemon.socket_path)
    try:
        assert loop.run_until_complete(client.set_linked_pod("afork", "parent", "svc", 1, -1)) is None
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                async def child() -> None:
                    assert await client.get_linked_pod("afork", "parent", "svc") == 1
                    await client.set_linked_pod("afork", "child", "svc", 2, -1)
                asyncio.run(child())
                code = 0
            finally:
                os._exit(code)
        assert loop.run_until_complete(client.get_linked_pod("afork", "parent", "svc")) == 1
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert loop.run_until_complete(client.get_linked_pod("afork", "child", "svc")) == 2
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


@FLAVOURS
def test_daemon_restart_next_call_reconnects(flavour: str, redis_server: RedisServer,
                                             redis_db: redis.Redis) -> None:
    first = Daemon(redis_server.url).start()
    second: Daemon | None = None
    try:
        with flavour_call(flavour, first.socket_path, timeout_s=5) as call:
            assert call("set_linked_pod", "rs", "u", "svc", 1, -1) is None
            assert first.stop() == 0
            second = Daemon(redis_server.url, dir=first.dir).start()
            # A write first: the blocking client meets the dead connection before sending on it.
            assert call("set_linked_pod", "rs", "u", "svc", 2, -1) == 1
            assert call("get_linked_pod", "rs", "u", "svc") == 2
            assert second.stop() == 0
            with pytest.raises(SocketNotFoundError):  # the daemon removed its socket on exit
                call("ping")
            second = Daemon(redis_server.url, dir=first.dir).start()
            assert call("get_linked_pod", "rs", "u", "svc") == 2
    finally:
        if second is not None:
            second.stop()
        first.cleanup()


@FLAVOURS
def test_missing_socket_and_stale_socket(flavour: str) -> None:
    directory = short_tmpdir("sfm-")
    try:
        missing = os.path.join(directory, "missing.sock")
        with flavour_call(flavour, missing) as call:
            started = time.monotonic()
            with pytest.raises(SocketNotFoundError, match=r"missing\.sock") as excinfo:
                call("ping")
            assert isinstance(excinfo.value, ConnectionError) and isinstance(excinfo.value.__cause__, OSError)
            assert time.monotonic() - started < 1.0
        stale = os.path.join(directory, "stale.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(stale)  # a socket file nobody listens on: what a killed daemon leaves
        with flavour_call(flavour, stale) as call, pytest.raises(ConnectRefusedError):
            call("set_linked_pod", "g", "u", "s", 1, -1)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@FLAVOURS
def test_stopped_daemon_times_out_then_next_call_is_right(flavour: str, daemon: Daemon) -> None:
    with flavour_call(flavour, daemon.socket_path) as call:
        call("set_linked_pod", "to", "before", "svc", 1, -1)
        with stopped(daemon):
            started = time.monotonic()
            with pytest.raises(ClientTimeoutError) as excinfo:
                call("set_linked_pod", "to", "stale", "svc", 7, -1, timeout_s=0.3)
            elapsed_s = time.monotonic() - started
            assert isinstance(excinfo.value, TimeoutError)
            assert 0.25 <= elapsed_s < 1.0, elapsed_s
        # The stale call's reply comes first on this connection; it must not be taken for ours.
        assert call("get_linked_pod", "to", "before", "svc", timeout_s=5) == 1
        assert call("ping") == "PONG"


def test_timeout_bounds_connecting_to_a_stopped_daemon(daemon: Daemon) -> None:
    with stopped(daemon), Client(daemon.socket_path) as client:
        started = time.monotonic()
        with pytest.raises(ClientTimeoutError):
            client.ping(timeout_s=0.3)
        assert time.monotonic() - started < 1.0


def test_cancelled_call_leaves_the_others_alone(daemon: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client:
            await client.set_linked_pod("cancel", "u", "svc", 1, -1)
            with stopped(daemon):
                doomed = asyncio.ensure_future(client.set_linked_pod("cancel", "doomed", "svc", 9, -1))
                kept = asyncio.ensure_future(client.get_linked_pod("cancel", "u", "svc"))
                await written(client)  # both are on the wire now
                doomed.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await doomed
            assert await asyncio.wait_for(kept, 5) == 1
            # The cancelled call's reply arrived (or will) and was dropped: nothing waits, calls match.
            results = await asyncio.gather(*(client.get_linked_pod("cancel", "u", "svc") for _ in range(20)))
            assert results == [1] * 20
            conn = client._conn
            assert conn is not None and not conn.pending
            # Cancelling calls at random points, many times over, never mismatches a reply.
            tasks = [asyncio.ensure_future(client.set_linked_pod("cancel", f"c{i}", "svc", i, -1)) for i in range(200)]
            for task in tasks[::3]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for i, task in enumerate(tasks):
                if not task.cancelled():
                    assert task.result() is None
                    assert await client.get_linked_pod("cancel", f"c{i}", "svc") == i

    asyncio.run(scenario())


@FLAVOURS
def test_notifications_are_executed_without_reply(flavour: str, daemon: Daemon, redis_db: redis.Redis) -> None:
    ns = f"notify-{flavour}"
    with flavour_call(flavour, daemon.socket_path) as call:
        assert call("notify_service_state", ns, "lobby", 3, "Ready") is None
        assert call("notify", "set_service_state", ns, "lobby", 4, "Draining") is None
        # A rejected notification is only logged: the connection and later calls go on.
        assert call("notify_service_state", ns, "bad:service", 1, "Ready") is None
        wait_for(lambda: call("get_service_state", ns, "lobby") == {3: "Ready", 4: "Draining"}, timeout_s=5,
                 what="the notifications to take effect")
        assert call("ping") == "PONG"
        assert call("report_pod_load", ns, "lobby", 3, 1) is None
        assert call("notify_pod_load", ns, "lobby", 3, 42) is None
        loads = redis_db.hgetall(f"sf:{{{ns}:state:lobby}}load")
        wait_for(lambda: str(redis_db.hget(f"sf:{{{ns}:state:lobby}}load", "3")).startswith("42:"),
                 timeout_s=5, what=f"the load report to land (had {loads})")


def test_close_wakes_a_call_blocked_in_another_thread(start: Callable[[Any], Any]) -> None:
    redis_server = start(RedisServer())
    daemon = start(Daemon(redis_server.url, args=["--request-timeout-ms", "10000"]))
    client = Client(daemon.socket_path, timeout_s=10)
    client.ping()
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            client.get_linked_pod("closing", "u", "svc")
        except BaseException as exc:
            outcome.append(exc)

    with redis_server.paused():  # the call waits in the daemon, its thread in recv()
        thread = threading.Thread(target=blocked)
        thread.start()
        wait_for(lambda: in_flight(daemon.socket_path) == 1, what="the call in the daemon")
        started = time.monotonic()
        client.close()
        thread.join(5)
        assert time.monotonic() - started < 2.0
    assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError), outcome
    with pytest.raises(ClientClosedError):
        client.ping()


def test_aclose_fails_pending_calls_and_refuses_new_ones(daemon: Daemon) -> None:
    async def scenario() -> None:
        client = AsyncClient(daemon.socket_path, timeout_s=10)
        await client.ping()
        with stopped(daemon):
            pending = asyncio.ensure_future(client.get_linked_pod("closing", "u", "svc"))
            await written(client)
            await client.aclose()
            with pytest.raises(ClientClosedError):
                await pending
        with pytest.raises(ClientClosedError):
            await client.ping()
        with pytest.raises(ClientClosedError):
            async with client:
                pass

    asyncio.run(scenario())


@FLAVOURS
def test_default_timeout_of_the_lean_path(flavour: str, daemon: Daemon) -> None:
    # Calls without timeout_s= take the shells' lean path: the AsyncClient's per-connection
    # deadline sweep, the blocking Client's kernel timeouts (SO_RCVTIMEO) instead of poll().
    with flavour_call(flavour, daemon.socket_path, timeout_s=0.3) as call:
        call("set_linked_pod", "lean", "before", "svc", 1, -1)
        with stopped(daemon):
            started = time.monotonic()
            with pytest.raises(ClientTimeoutError) as excinfo:
                call("set_linked_pod", "lean", "stale", "svc", 7, -1)
            elapsed_s = time.monotonic() - started
            assert isinstance(excinfo.value, TimeoutError)
            assert "set_linked_pod" in str(excinfo.value)
            assert 0.25 <= elapsed_s < 1.0, elapsed_s
        assert call("get_linked_pod", "lean", "before", "svc") == 1
        assert call("get_linked_pod", "lean", "stale", "svc") == 7  # the late write did run
        assert [call("ping") for _ in range(50)] == ["PONG"] * 50


@pytest.mark.parametrize("kind", ["directory", "regular file"])
def test_a_path_that_is_no_socket_says_so(kind: str) -> None:
    directory = short_tmpdir()
    path = os.path.join(directory, "statefuld.sock")
    try:
        if kind == "directory":
            os.mkdir(path)
        else:
            open(path, "w").close()
        with Client(path) as client, pytest.raises(TransportError) as info:
            client.ping()
    finally:
        shutil.rmtree(directory)
    assert str(info.value) == f"{path} is a {kind}, not the daemon's socket: check socket_path or STATEFULD_SOCKET"
    assert not isinstance(info.value, ConnectRefusedError)
