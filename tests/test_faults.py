"""Faults under load: a real Redis and a real daemon, real clients calling concurrently.

Each scenario injects one fault (Redis killed, Redis paused, scripts flushed, clients vanishing,
a flood, the daemon killed) while callers keep going, then checks what users rely on: every call
ends within its deadline with a right answer or a retryable error, the daemon recovers by itself,
and every write acknowledged as successful is in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import redis
from support import (
    Daemon,
    RawClient,
    RedisServer,
    fd_count,
    open_sockets,
    rpc_call,
    rss_kib,
    run_async,
    running,
    wait_for,
)

from statefuld_client import (
    AsyncClient,
    ConnectionLostError,
    ConnectRefusedError,
    DeadlineExceededError,
    OverloadedError,
    SocketNotFoundError,
    StatefuldError,
    UnavailableError,
)

pytestmark = pytest.mark.slow

NS, SVC = "faults", "lobby"
AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]


def link_key(uid: str) -> str:
    return f"sf:{{{NS}:lk:{uid}}}{SVC}"



@contextlib.asynccontextmanager
async def async_clients(path: str, count: int, timeout_s: float = 5.0) -> AsyncIterator[list[AsyncClient]]:
    clients = [AsyncClient(path, timeout_s=timeout_s) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


async def stop_load(stop: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> None:
    stop.set()
    await asyncio.gather(*tasks)


# --- what a process uses, from /proc ------------------------------------------------------------


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Call:
    uid: str
    value: int
    started: float
    ended: float
    outcome: str  # "ok", an error code, or the repr of anything unexpected
    result: Any = None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, UnavailableError):
        return "UNAVAILABLE"
    if isinstance(exc, DeadlineExceededError):
        return "TIMEOUT"
    if isinstance(exc, OverloadedError):
        return "OVERLOADED"
    if isinstance(exc, ConnectionLostError | ConnectRefusedError | SocketNotFoundError):
        return "DAEMON_DOWN"
    return repr(exc)


async def unique_writer(client: AsyncClient, worker: int, stop: asyncio.Event, calls: list[Call]) -> None:
    """set_linked_pod on a fresh uid each time: a write's presence in Redis tells whether it happened."""
    loop = asyncio.get_running_loop()
    seq = 0
    while not stop.is_set():
        seq += 1
        uid = f"w{worker}-{seq}"
        started = loop.time()
        try:
            result = await client.set_linked_pod(NS, uid, SVC, seq, -1)
            outcome = "ok"
        except StatefuldError as exc:
            result, outcome = None, outcome_of(exc)
        calls.append(Call(uid, seq, started, loop.time(), outcome, result))
        if outcome != "ok":
            await asyncio.sleep(0.01)  # a caller's backoff: a dead Redis is answered at once


async def checked_reader(client: AsyncClient, worker: int, stop: asyncio.Event, calls: list[Call],
                         known: int) -> None:
    """get_linked_pod on uids r0..r{known-1}, linked beforehand to pod = their number."""
    loop = asyncio.get_running_loop()
    i = worker
    while not stop.is_set():
        i = (i + 7) % known
        started = loop.time()
        try:
            result = await client.get_linked_pod(NS, f"r{i}", SVC)
            outcome = "ok"
        except StatefuldError as exc:
            result, outcome = None, outcome_of(exc)
        calls.append(Call(f"r{i}", i, started, loop.time(), outcome, result))
        if outcome != "ok":
            await asyncio.sleep(0.01)


def seed_readable_links(client: redis.Redis, count: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.set(link_key(f"r{i}"), i)
        pipe.execute()


def assert_acknowledged_writes_present(client: redis.Redis, calls: list[Call]) -> int:
    acked = [c for c in calls if c.outcome == "ok" and c.uid.startswith("w")]
    with client.pipeline(transaction=False) as pipe:
        for c in acked:
            pipe.get(link_key(c.uid))
        stored = pipe.execute()
    lost = [(c.uid, c.value, s) for c, s in zip(acked, stored, strict=True) if s != str(c.value)]
    assert not lost, f"{len(lost)} acknowledged writes not in Redis, e.g. {lost[:5]}"
    return len(acked)


def assert_reads_right(calls: list[Call]) -> None:
    wrong = [c for c in calls if c.outcome == "ok" and c.uid.startswith("r") and c.result != c.value]
    assert not wrong, f"reads answered with another key's value: {wrong[:5]}"


def restart_redis(old: RedisServer, extra_args: list[str]) -> RedisServer:
    """A new redis-server on the same directory and socket path (it replaces the dead one's socket file)."""
    return RedisServer(dir=old.dir, extra_args=extra_args).start()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    with running(RedisServer(extra_args=AOF_ALWAYS)) as server:
        yield server


# --- Redis killed -------------------------------------------------------------------------------


def test_redis_killed_mid_load_fails_fast_recovers_and_loses_no_acknowledged_write(
        aof_redis: RedisServer) -> None:
    timeout_s = 1.0
    seed_readable_links(aof_redis.client(), 50)
    servers = [aof_redis]
    with running(Daemon(aof_redis.url, args=["--request-timeout-ms", str(int(timeout_s * 1000))])) as daemon:

        async def scenario() -> tuple[list[Call], dict[str, float]]:
            calls: list[Call] = []
            stop = asyncio.Event()
            async with async_clients(daemon.socket_path, 4, timeout_s + 3) as clients:
                tasks = [asyncio.create_task(unique_writer(c, 10 * n + w, stop, calls))
                         for n, c in enumerate(clients) for w in range(6)]
                tasks += [asyncio.create_task(checked_reader(c, n, stop, calls, 50)) for n, c in enumerate(clients)]
                marks = await kill_and_restart_redis(calls)
                await stop_load(stop, tasks)
            return calls, marks

        async def kill_and_restart_redis(calls: list[Call]) -> dict[str, float]:
            loop = asyncio.get_running_loop()
            marks: dict[str, float] = {}
            await asyncio.sleep(0.5)
            marks["killed"] = loop.time()
            aof_redis.kill()
            await asyncio.sleep(1.0)
            marks["restarting"] = loop.time()
            servers.append(await loop.run_in_executor(None, restart_redis, aof_redis, AOF_ALWAYS))
            marks["restarted"] = loop.time()
            while not any(c.outcome == "ok" and c.started > marks["restarted"] for c in calls):
                assert loop.time() - marks["restarted"] < 5, "the daemon did not serve again within 5 s"
                await asyncio.sleep(0.01)
            marks["serving"] = min(c.ended for c in calls if c.outcome == "ok" and c.started > marks["restarted"])
            await asyncio.sleep(0.5)
            return marks

        try:
            calls, marks = run_async(scenario, timeout_s=20)
            stored = servers[-1].client()
            acknowledged = assert_acknowledged_writes_present(stored, calls)
        finally:
            for server in servers[1:]:
                server.stop()
        outcomes = {c.outcome for c in calls}
        assert outcomes <= {"ok", "UNAVAILABLE", "TIMEOUT"}, outcomes
        assert {"ok", "UNAVAILABLE"} <= outcomes
        slowest = max(c.elapsed for c in calls)
        assert slowest < timeout_s + 0.5, f"a call took {slowest:.2f}s with a {timeout_s}s deadline"
        # While Redis was gone, nothing succeeded.
        down = [c for c in calls if c.started > marks["killed"] + 0.05 and c.ended < marks["restarting"]]
        assert down and all(c.outcome != "ok" for c in down)
        assert_reads_right(calls)
        recovery_s = marks["serving"] - marks["restarted"]
        assert recovery_s < 3.0
        # Scripts were loaded again by the daemon itself (the new Redis started with an empty cache).
        after = [c for c in calls if c.started > marks["serving"] and c.uid.startswith("w")]
        assert after and all(c.outcome == "ok" for c in after)
        print(f"redis killed: recovery {recovery_s * 1000:.0f} ms after restart, slowest call {slowest:.2f}s, "
              f"{acknowledged} acknowledged writes all in Redis, {len(calls)} calls")


# --- Redis paused -------------------------------------------------------------------------------


def test_redis_paused_times_out_at_the_deadline_keeps_ping_and_leaves_no_stale_reply() -> None:
    timeout_s = 0.5
    with running(RedisServer()) as server, \
            running(Daemon(server.url, args=["--request-timeout-ms", str(int(timeout_s * 1000))])) as daemon:
        seed_readable_links(server.client(), 200)

        async def scenario() -> tuple[list[Call], list[tuple[float, float]], dict[str, float]]:
            loop = asyncio.get_running_loop()
            calls: list[Call] = []
            pings: list[tuple[float, float]] = []
            stop = asyncio.Event()
            async with async_clients(daemon.socket_path, 3, timeout_s + 3) as clients:
                tasks = [asyncio.create_task(checked_reader(c, 10 * n + w, stop, calls, 200))
                         for n, c in enumerate(clients) for w in range(8)]
                tasks += [asyncio.create_task(unique_writer(c, n, stop, calls)) for n, c in enumerate(clients)]
                tasks.append(asyncio.create_task(pinger(stop, pings)))
                marks: dict[str, float] = {}
                await asyncio.sleep(0.4)
                marks["paused"] = loop.time()
                server.pause()
                await asyncio.sleep(1.5)
                server.resume()
                marks["resumed"] = loop.time()
                await asyncio.sleep(1.0)
                await stop_load(stop, tasks)
            return calls, pings, marks

        async def pinger(stop: asyncio.Event, pings: list[tuple[float, float]]) -> None:
            loop = asyncio.get_running_loop()
            async with AsyncClient(daemon.socket_path, timeout_s=2) as client:
                while not stop.is_set():
                    started = loop.time()
                    assert await client.ping() == "PONG"
                    pings.append((started, loop.time() - started))
                    await asyncio.sleep(0.02)

        try:
            calls, pings, marks = run_async(scenario, timeout_s=20)
        finally:
            server.resume()
        outcomes = {c.outcome for c in calls}
        assert outcomes <= {"ok", "TIMEOUT"}, outcomes
        during = [c for c in calls if c.started > marks["paused"] + 0.01 and c.ended < marks["resumed"]]
        assert during and all(c.outcome == "TIMEOUT" for c in during)
        # TIMEOUT at the deadline: not before it, and not much after (the sweep runs every 10 ms).
        late = max(c.elapsed for c in during)
        assert all(c.elapsed >= timeout_s - 0.02 for c in during)
        assert late < timeout_s + 0.3, f"TIMEOUT came {late:.2f}s after the call"
        paused_pings = [d for t, d in pings if marks["paused"] < t < marks["resumed"]]
        assert len(paused_pings) > 20 and max(paused_pings) < 0.2
        # Redis answered the timed-out commands after SIGCONT; those replies must have been dropped,
        # never handed to a later caller: every read after the resume returns its own key's value.
        after = [c for c in calls if c.started > marks["resumed"] + 0.05]
        assert after and all(c.outcome == "ok" for c in after)
        assert_reads_right(calls)
        assert_acknowledged_writes_present(server.client(), calls)
        print(f"redis paused: {len(during)} TIMEOUTs, latest {late:.3f}s for a {timeout_s}s deadline; "
              f"ping max {max(paused_pings) * 1000:.1f} ms during the pause")


# --- SCRIPT FLUSH -------------------------------------------------------------------------------


def test_script_flush_under_load_is_invisible_to_callers() -> None:
    with running(RedisServer()) as server, running(Daemon(server.url)) as daemon:
        flusher_stop = threading.Event()
        flushes = 0

        def flusher() -> None:
            nonlocal flushes
            client = server.client()
            while not flusher_stop.is_set():
                client.script_flush()
                flushes += 1
                time.sleep(0.005)

        async def worker(client: AsyncClient, n: int, stop: asyncio.Event, errors: list[str]) -> int:
            # Each worker owns its user: every script's answer is known in advance.
            uid, pod, done = f"flush{n}", 0, 0
            while not stop.is_set():
                try:
                    answers = [
                        (await client.set_linked_pod(NS, uid, SVC, pod + 1, -1), pod or None),
                        (await client.try_set_linked_pod(NS, uid, SVC, pod + 1, -1), (True, pod + 1)),
                        (await client.set_linked_pod_if_absent(NS, uid, SVC, 999, -1), pod + 1),
                        (await client.get_linked_pod_if_persist(NS, uid, SVC), pod + 1),
                    ]
                    errors += [f"got {got!r}, expected {expected!r}" for got, expected in answers if got != expected]
                    done += 4
                except StatefuldError as exc:
                    errors.append(repr(exc))
                pod = await client.get_linked_pod(NS, uid, SVC) or 0
            return done

        async def scenario() -> tuple[int, list[str]]:
            errors: list[str] = []
            stop = asyncio.Event()
            async with async_clients(daemon.socket_path, 2) as clients:
                tasks = [asyncio.create_task(worker(c, 100 * i + j, stop, errors))
                         for i, c in enumerate(clients) for j in range(16)]
                await asyncio.sleep(2.0)
                stop.set()
                done = sum(await asyncio.gather(*tasks))
            return done, errors

        thread = threading.Thread(target=flusher)
        thread.start()
        try:
            done, errors = run_async(scenario, timeout_s=15)
        finally:
            flusher_stop.set()
            thread.join()
        assert flushes > 50 and done > 1000
        assert not errors, f"{len(errors)} callers saw an error, e.g. {errors[:3]}"


# --- clients that vanish, pile up, or never read --------------------------------------------------



def timed_get(client: RawClient) -> float:
    """get_linked_pod r1 (linked to 1) on a raw connection: check the answer, return the latency."""
    started = time.monotonic()
    assert client.call(1, "get_linked_pod", [NS, "r1", SVC]) == (None, 1)
    return time.monotonic() - started


def send_without_reading(path: str, request: bytes, pid: int) -> tuple[int, int, bool]:
    """Send `request` for 3 s and never read: (requests sent, peak RSS of pid, cut by the daemon)."""
    sent, peak_rss, cut = 0, 0, False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
        hog.setblocking(False)
        hog.connect(path)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not cut:
            try:
                hog.send(request * 100)
                sent += 100
            except BlockingIOError:
                time.sleep(0.05)  # the daemon stopped reading us
            except (BrokenPipeError, ConnectionResetError):
                cut = True
            peak_rss = max(peak_rss, rss_kib(pid))
    return sent, peak_rss, cut


def test_vanishing_and_idle_clients_and_a_non_reader_leave_memory_and_fds_bounded() -> None:
    with running(RedisServer()) as server, running(Daemon(server.url)) as daemon, \
            RawClient(daemon.socket_path) as bystander:
        pid = daemon_pid(daemon)
        path = daemon.socket_path
        client = server.client()
        client.set(link_key("r1"), 1)
        latencies: list[float] = []

        def bystander_ok() -> None:
            latencies.append(timed_get(bystander))

        for _ in range(3):  # warm up: imports, buffers, the allocator's arenas
            socks = open_sockets(path, 100)
            for s in socks:
                s.sendall(msgpack.packb([0, 1, "get_linked_pod", [NS, "r1", SVC]]))
            for s in socks:
                s.close()
        bystander_ok()
        time.sleep(0.3)
        base_rss, base_fds = rss_kib(pid), fd_count(pid)

        # 1,000 connections open at once, then dropped.
        socks = open_sockets(path, 1000)
        try:
            wait_for(lambda: fd_count(pid) >= base_fds + 1000, timeout_s=5, what="1,000 connections accepted")
            bystander_ok()
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: fd_count(pid) <= base_fds + 2, timeout_s=5, what="fds back to baseline")

        # Clients vanishing mid-request: pipelined requests then gone, or gone mid-message.
        whole = b"".join(msgpack.packb([0, i, "set_linked_pod", [NS, f"gone{i}", SVC, i, -1]]) for i in range(20))
        half = msgpack.packb([0, 1, "set_linked_pod", [NS, "half", SVC, 1, -1]])[:20]
        for n, s in enumerate(open_sockets(path, 300)):
            with s:
                s.sendall(whole if n % 2 else half)
        bystander_ok()
        wait_for(lambda: fd_count(pid) <= base_fds + 2, timeout_s=5, what="fds back after vanished clients")
        assert client.get(link_key("half")) is None  # half a message is never executed

        # A client that sends and never reads, asking for a ~200 KiB reply with each 30-byte request.
        # The daemon stops reading it (flow control) and cuts it once its unread replies pass 32 MiB.
        client.hset(f"sf:{{{NS}:state:{SVC}}}", mapping={str(i): "s" * 4000 for i in range(50)})
        request = msgpack.packb([0, 1, "get_service_state", [NS, SVC]])

        def non_reader() -> tuple[int, int, bool]:
            sent, peak_rss, cut = send_without_reading(path, request, pid)
            wait_for(lambda: fd_count(pid) <= base_fds + 2, timeout_s=5, what="fds back after the non-reader")
            # Its replies' memory goes back to the system, not only to the allocator's free lists.
            wait_for(lambda: rss_kib(pid) - base_rss < 16 * 1024, timeout_s=5, what="memory handed back")
            bystander_ok()
            return sent, peak_rss, cut

        rounds = [(*non_reader(), rss_kib(pid)) for _ in range(2)]
        print(f"memory: baseline {base_rss} KiB; non-reader rounds (requests sent, peak KiB, cut, KiB after): "
              f"{rounds}; fds baseline {base_fds}; bystander latencies {[round(x * 1000) for x in latencies]} ms")
        for sent, peak_rss, cut, _after in rounds:
            # 20,000 requests would be 4 GB of replies: the daemon stopped reading long before.
            assert sent < 20_000, "the daemon kept reading from a client that never reads"
            # At most --max-in-flight-per-connection of its requests run at once, and their
            # replies pass 32 MiB unread: the daemon cuts it rather than hold them.
            assert cut, "the daemon held the replies of a client that never reads instead of cutting it"
            assert peak_rss - base_rss < 128 * 1024, f"RSS grew {peak_rss - base_rss} KiB for one non-reader"
        # Both rounds end back near the baseline: no leak, and nothing kept at the peak.
        assert all(after - base_rss < 16 * 1024 for *_, after in rounds), rounds
        assert max(latencies[:4]) < 0.5  # idle and vanishing clients did not slow the bystander


# --- a flood --------------------------------------------------------------------------------------


def test_a_flood_past_max_in_flight_is_shed_at_once_and_ping_still_answers() -> None:
    limit = 64
    args = ["--max-in-flight", str(limit), "--request-timeout-ms", "5000"]
    with running(RedisServer()) as server, running(Daemon(server.url, args=args)) as daemon:
        pid = daemon_pid(daemon)
        rpc_call(daemon.socket_path, "get_linked_pod", [NS, "x", SVC])
        base_rss = rss_kib(pid)

        async def scenario() -> tuple[list[Call], float, str]:
            loop = asyncio.get_running_loop()
            calls: list[Call] = []
            async with async_clients(daemon.socket_path, 4, 10) as clients:
                await asyncio.gather(*[c.ping() for c in clients])  # connected before the pause
                with server.paused():
                    flood_started = loop.time()
                    tasks = [asyncio.create_task(one(clients[i % 4], i, calls)) for i in range(4000)]
                    while sum(c.outcome == "OVERLOADED" for c in calls) < 4000 - limit:
                        assert loop.time() - flood_started < 3, "the flood was not shed within 3 s"
                        await asyncio.sleep(0.01)
                    shed_s = max(c.ended for c in calls) - flood_started
                    # The daemon is saturated, yet a liveness probe still gets its PONG.
                    pong = await clients[0].ping(timeout_s=1)
                await asyncio.gather(*tasks)
            return calls, shed_s, pong

        async def one(client: AsyncClient, i: int, calls: list[Call]) -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                result, outcome = await client.get_linked_pod(NS, f"flood{i}", SVC), "ok"
            except StatefuldError as exc:
                result, outcome = None, outcome_of(exc)
            calls.append(Call(f"flood{i}", i, started, loop.time(), outcome, result))

        calls, shed_s, pong = run_async(scenario, timeout_s=20)
        peak_rss = rss_kib(pid)
        shed = [c for c in calls if c.outcome == "OVERLOADED"]
        served = [c for c in calls if c.outcome != "OVERLOADED"]
        assert len(shed) == 4000 - limit and len(served) == limit
        assert all(c.outcome == "ok" and c.result is None for c in served)
        assert shed_s < 2.0, f"shedding 3,936 requests took {shed_s:.2f}s"
        assert pong == "PONG"
        assert peak_rss - base_rss < 32 * 1024
        print(f"flood: {len(shed)} OVERLOADED within {shed_s * 1000:.0f} ms")


# --- the daemon killed ----------------------------------------------------------------------------


def test_daemon_sigkilled_under_load_restarts_cleanly_and_loses_no_acknowledged_write(
        aof_redis: RedisServer) -> None:
    daemon = Daemon(aof_redis.url, args=["--request-timeout-ms", "1000"])
    with running(daemon):

        async def scenario() -> tuple[list[Call], dict[str, float]]:
            calls: list[Call] = []
            stop = asyncio.Event()
            async with async_clients(daemon.socket_path, 3, 3) as clients:
                tasks = [asyncio.create_task(unique_writer(c, 10 * n + w, stop, calls))
                         for n, c in enumerate(clients) for w in range(8)]
                marks = await kill_and_restart_daemon(calls)
                await stop_load(stop, tasks)
            return calls, marks

        async def kill_and_restart_daemon(calls: list[Call]) -> dict[str, float]:
            loop = asyncio.get_running_loop()
            marks: dict[str, float] = {}
            await asyncio.sleep(0.5)
            marks["killed"] = loop.time()
            daemon.signal(signal.SIGKILL)
            await loop.run_in_executor(None, daemon.wait, 5)
            assert os.path.exists(daemon.socket_path)  # the dead daemon's socket file stays behind
            await loop.run_in_executor(None, daemon.start)
            marks["restarted"] = loop.time()
            while not any(c.outcome == "ok" and c.started > marks["restarted"] for c in calls):
                assert loop.time() - marks["restarted"] < 5, "clients did not reconnect within 5 s"
                await asyncio.sleep(0.01)
            marks["serving"] = min(c.ended for c in calls if c.outcome == "ok" and c.started > marks["killed"])
            await asyncio.sleep(0.3)
            return marks

        calls, marks = run_async(scenario, timeout_s=25)
        outcomes = {c.outcome for c in calls}
        assert outcomes <= {"ok", "DAEMON_DOWN"}, outcomes
        assert "stale socket" in daemon.log()
        assert_acknowledged_writes_present(aof_redis.client(), calls)
        gap_s = marks["serving"] - marks["killed"]
        print(f"daemon SIGKILL: writes served again {gap_s * 1000:.0f} ms after the kill "
              f"(restart took {(marks['restarted'] - marks['killed']) * 1000:.0f} ms)")
