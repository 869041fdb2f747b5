"""Redis Cluster and Sentinel on real processes: detection, routing, batch reads per node,
MOVED/ASK, ACL users on every node, and failovers under load (measured; docs/OPERATIONS.md).

The contract's methods themselves run on a cluster and on a Sentinel set through the shared
fixtures (SFD_TEST_BACKEND, see conftest.py); this module tests what only those modes have.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.crc import key_slot
from support import Daemon, RedisClusterProcs, RedisSentinelProcs, RedisServer, rpc_call, run_async, running

from statefuld.config import Config
from statefuld.errors import Unavailable
from statefuld.executor import Executor
from statefuld.metrics import RedisWatch
from statefuld.scripts import load_scripts
from statefuld.transports import ClusterTransport, SentinelTransport, SentinelUrl, StandaloneTransport, make_transport

NS, SVC = "game", "lobby"
ACL = ["--user", "alice", "on", ">s3cret", "~*", "&*", "+@all"]


def link(uid: str) -> str:
    return f"sf:{{{NS}:lk:{uid}}}{SVC}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with running(RedisClusterProcs(extra_args=ACL)) as procs:
        yield procs


def connect(url: str, **config: Any) -> Any:
    return Executor.connect(Config(redis_url=url, startup_timeout_s=10, **config))


def transport_of(ex: Executor) -> Any:
    return ex._redis


# --- cluster ---------------------------------------------------------------------------------


def test_a_cluster_node_url_is_detected_and_every_primary_gets_the_scripts(cluster: RedisClusterProcs) -> None:
    async def body() -> Any:
        ex = await connect(cluster.url, redis_username="alice", redis_password="s3cret")
        try:
            return transport_of(ex), await ex.health()
        finally:
            await ex.close()

    transport, health = run_async(body)
    assert isinstance(transport, ClusterTransport) and health == {"ready": True, "redis": "ok"}
    shas = [s.sha for s in load_scripts().values()]
    primaries = cluster.primaries()
    assert len(primaries) == 3
    for node in primaries:
        assert node.client().script_exists(*shas) == [True] * len(shas)


def test_batch_reads_are_one_write_per_node_and_one_mget_per_slot(cluster: RedisClusterProcs) -> None:
    uids = [f"user-{i}" for i in range(300)]
    with cluster.client() as c:
        for i, uid in enumerate(uids):
            c.set(link(uid), str(i % 7))
        slots = {key_slot(link(uid).encode()) for uid in uids}
        nodes = {c.get_node_from_key(link(uid)).port for uid in uids}

    async def body() -> Any:
        ex = await connect(cluster.url, redis_username="alice", redis_password="s3cret")
        try:
            transport = transport_of(ex)
            before = transport.stats()
            result = await ex.batch_get_linked_pod(NS, uids, SVC)
            return result, before, transport.stats()
        finally:
            await ex.close()

    result, before, after = run_async(body)
    assert result == {pod: [uid for i, uid in enumerate(uids) if i % 7 == pod] for pod in range(7)}
    assert after["commands"] - before["commands"] == len(slots)  # one MGET per slot ...
    assert after["writes"] - before["writes"] == len(nodes) == 3  # ... all of a node's in one write


def test_ask_during_a_migration_and_moved_after_it_are_followed(cluster: RedisClusterProcs) -> None:
    uid = "migrating-user"
    key, hash_key = link(uid), f"sf:{{{NS}:lk:{uid}}}"
    slot = key_slot(key.encode())

    async def body() -> Any:
        ex = await connect(cluster.url, redis_username="alice", redis_password="s3cret")
        try:
            await ex.set_linked_pod(NS, uid, SVC, 4, -1)
            source = cluster.node_serving(key)
            target = next(n for n in cluster.primaries() if n is not source)
            src: Any = source.client()
            dst: Any = target.client()
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key, hash_key)
            redirects = transport_of(ex).redirects
            during = (await ex.get_linked_pod(NS, uid, SVC), await ex.set_linked_pod(NS, uid, SVC, 5, -1))
            asked = transport_of(ex).redirects - redirects
            for node in cluster.primaries():
                client: Any = node.client()
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            after = (await ex.get_linked_pod(NS, uid, SVC), await ex.get_link_service(NS, uid))
            return during, asked, after, transport_of(ex).redirects - redirects
        finally:
            await ex.close()

    during, asked, after, redirects = run_async(body)
    assert during == (4, 4) and asked == 2  # ASK, answered by the importing node
    assert after == (5, {SVC: 5}) and redirects >= 3  # then MOVED, and the slot table follows


def test_explicit_modes() -> None:
    with running(RedisServer()) as server:
        with pytest.raises(ValueError, match="not a Redis Cluster node"):
            run_async(lambda: connect(server.url, redis_mode="cluster"))
        with pytest.raises(ValueError, match="redis_mode sentinel needs"):
            make_transport(Config(redis_url=server.url, redis_mode="sentinel"))
    sentinel_url = "redis+sentinel://a:1,b:2/mymaster"
    assert isinstance(make_transport(Config(redis_url=sentinel_url)), SentinelTransport)
    assert isinstance(make_transport(Config(redis_url="redis://h:1", redis_mode="cluster")), ClusterTransport)
    assert isinstance(make_transport(Config(redis_url="redis://h:1", redis_mode="standalone")), StandaloneTransport)


def test_sentinel_url_forms() -> None:
    parsed = SentinelUrl.parse("rediss+sentinel://u:p%40ss@h1:26379,[::1]:26380/my-master/2")
    assert parsed.sentinels == [("h1", 26379), ("::1", 26380)]
    assert (parsed.master_name, parsed.db, parsed.tls, parsed.username, parsed.password) == (
        "my-master", 2, True, "u", "p@ss")
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel://h1/m", "redis+sentinel://h:1/m/x"):
        with pytest.raises(ValueError):
            SentinelUrl.parse(bad)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_ipv6_sentinel_address_is_bracketed_in_the_node_url() -> None:
    transport = make_transport(Config(redis_url="rediss+sentinel://[::1]:26379,h:26380/mymaster/2"))
    assert isinstance(transport, SentinelTransport)
    assert transport.describe().startswith("Redis Sentinel [::1]:26379,h:26380 master 'mymaster'")
    assert SentinelUrl.parse("redis+sentinel://[::1]:1/m/3").node_url(("::1", 7)) == "redis://[::1]:7/3"


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_daemon_starts_and_serves_with_ipv6_sentinels() -> None:
    with running(RedisSentinelProcs(host="::1")) as procs:
        assert procs.url.startswith("redis+sentinel://[::1]:")
        with running(Daemon(procs.url)) as daemon:
            assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "v6", SVC, 6, -1]) == (None, None)
            assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, "v6", SVC]) == (None, 6)
            assert f"primary: [::1]:{procs.primary.port}" in daemon.log()
        assert procs.primary.client().get(link("v6")) == "6"


def test_sentinel_follows_the_primary_with_an_acl_user(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running(RedisSentinelProcs(acl=ACL)) as procs:
        async def body() -> Any:
            ex = await connect(procs.url, redis_username="alice", redis_password="s3cret")
            try:
                await ex.set_workload_state(NS, SVC, "Serving")
                assert transport_of(ex).stats()["switches"] == 0  # finding the primary is no failover
                return transport_of(ex).describe(), await ex.health()
            finally:
                await ex.close()

        described, health = run_async(body)
        assert health == {"ready": True, "redis": "ok"}
        assert f"primary: 127.0.0.1:{procs.primary.port}" in described
        assert procs.primary.client().get(f"sf:{{{NS}:workload:{SVC}}}") == "Serving"
        # The primary found at start is said at info: no warning that reads like a failover.
        found = [r for r in caplog.records if r.getMessage().startswith("Redis primary")]
        assert [(r.levelname, r.getMessage()) for r in found] == [
            ("INFO", f"Redis primary 'mymaster' is at 127.0.0.1:{procs.primary.port}")]


# --- failover under load ---------------------------------------------------------------------


@dataclass
class FailoverRun:
    killed_at: float = 0.0
    acked: dict[str, tuple[int, float]] = field(default_factory=dict)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stats: list[dict[str, int]] = field(default_factory=list)  # the transport's, every 10 ms

    def window_s(self) -> float:
        """From the kill to the last failed call."""
        return self.errors[-1][0] - self.killed_at if self.errors else 0.0


async def write_through_failover(ex: Executor, kill: Callable[[], None], *, writers: int = 16,
                                 quiet_s: float = 1.0, limit_s: float = 20.0) -> FailoverRun:
    """Writers link fresh users in a loop (each call bounded as the daemon's request deadline
    bounds it); ``kill`` runs mid-load; stops once calls have succeeded for ``quiet_s``. The
    transport's counters are sampled throughout, as a Prometheus scrape would read them."""
    run = FailoverRun()
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            run.stats.append(transport_of(ex).stats())
            await asyncio.sleep(0.01)

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            uid, pod = f"w{w}-{i}", i % 1000
            try:
                async with asyncio.timeout(2.0):
                    await ex.set_linked_pod(NS, uid, SVC, pod, -1)
                run.acked[uid] = (pod, time.monotonic())
            except (Unavailable, TimeoutError) as exc:
                run.errors.append((time.monotonic(), type(exc).__name__))
                await asyncio.sleep(0.01)  # a client backing off a little

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    tasks.append(asyncio.create_task(sampler()))
    try:
        await asyncio.sleep(0.5)
        run.killed_at = time.monotonic()
        kill()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if run.errors and now - run.errors[-1][0] > quiet_s:
                break
            assert now - run.killed_at < limit_s, f"still failing {limit_s}s after the kill"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return run


async def check_acknowledged(ex: Executor, run: FailoverRun) -> list[str]:
    """The acknowledged writes missing now (each must have been acknowledged before the kill:
    the asynchronous replication window)."""
    pods = await asyncio.gather(*(ex.get_linked_pod(NS, uid, SVC) for uid in run.acked))
    return [uid for uid, pod in zip(run.acked, pods, strict=True) if pod != run.acked[uid][0]]


def assert_counters_never_went_back(run: FailoverRun) -> None:
    """statefuld_redis_commands_total and _writes_total are these: a retired primary's counts stay."""
    assert len(run.stats) > 100
    for name in ("commands", "writes"):
        values = [stats[name] for stats in run.stats]
        drops = [(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(values)) if b < a]
        assert not drops, f"{name} went back: {drops[:3]}"


def failover_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "redis_failover"]


def report(what: str, run: FailoverRun, lost: list[str]) -> None:
    kinds = sorted({kind for _, kind in run.errors})
    print(f"\n{what}: errors for {run.window_s():.2f}s after the kill ({len(run.errors)} failed calls: {kinds}); "
          f"{len(run.acked)} writes acknowledged, {len(lost)} of them lost")


@pytest.mark.slow
def test_cluster_primary_killed_under_load(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running(RedisClusterProcs()) as procs:
        async def body() -> Any:
            ex = await connect(procs.url)
            try:
                victim = procs.node_serving(link("w0-1"))
                watch = RedisWatch(ex)
                run = await write_through_failover(ex, victim.kill)
                await watch.check()  # the daemon's once-a-second look at Redis
                return run, await check_acknowledged(ex, run), await ex.health(), victim.port
            finally:
                await ex.close()

        run, lost, health, victim_port = run_async(body, timeout_s=40)
    report("cluster", run, lost)
    assert run.errors and health["ready"] is True
    # The failover is seen as one: one primary replaced, counted and logged as a Sentinel switch is.
    assert run.stats[0]["switches"] == 0 and run.stats[-1]["switches"] == 1
    assert len(failover_events(caplog)) == 1
    assert any(f"primary 127.0.0.1:{victim_port} replaced" in r.getMessage() for r in caplog.records)
    assert_counters_never_went_back(run)
    assert all(run.acked[uid][1] < run.killed_at for uid in lost)
    assert len(lost) <= 16  # at most the writes in flight when the primary died (one per writer)
    assert run.window_s() < 10


@pytest.mark.slow
def test_sentinel_primary_killed_under_load(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running(RedisSentinelProcs()) as procs:
        async def body() -> Any:
            ex = await connect(procs.url)
            try:
                watch = RedisWatch(ex)
                run = await write_through_failover(ex, procs.primary.kill)
                await watch.check()
                return run, await check_acknowledged(ex, run), transport_of(ex).describe()
            finally:
                await ex.close()

        run, lost, described = run_async(body, timeout_s=40)
    report("sentinel", run, lost)
    assert run.errors and f"primary: 127.0.0.1:{procs.replica.port}" in described
    assert run.stats[-1]["switches"] - run.stats[0]["switches"] == 1 and len(failover_events(caplog)) == 1
    assert_counters_never_went_back(run)
    assert all(run.acked[uid][1] < run.killed_at for uid in lost)
    assert len(lost) <= 16
    assert run.window_s() < 10
