"""Watch benchmarks (docs/BENCHMARKS.md, "Watch").

    .venv/bin/python benchmarks/watch.py [--writes 2000] [--flood-s 5] [--poll-s 10]

Starts a private redis-server on a Unix socket and two `statefuld serve` (this checkout) on it, then
measures:

- delay: a write through daemon A (its reply received) to its event at a watcher on daemon B,
  one write at a time on an idle machine: p50 and p99;
- expiry lag: a temporary link's TTL end to its "expired" event;
- sustained link changes: writers change links as fast as they can for --flood-s seconds while 10,
  then 100, watchers (AsyncWatch, one connection each) read every event: events/s delivered per
  watcher and the gaps;
- polling against watching: Redis commands and bytes a gateway costs for a service of 100 pods,
  polling get_service_state every 100 ms, or watching it, with one pod changing state a second.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from support import Daemon, RedisServer, running  # noqa: E402

NS, SERVICE = "bench", "lobby"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def delay(a: str, b: str, writes: int) -> str:
    from statefuld_client import AsyncClient

    async with AsyncClient(a) as writer, AsyncClient(b) as reader:
        watch = await reader.watch_service(NS, SERVICE)
        async with watch:
            await watch.__anext__()  # the snapshot
            delays = []
            for n in range(writes):
                await writer.set_service_state(NS, SERVICE, 1, f"s{n}")
                replied = time.perf_counter()
                while (await watch.__anext__()).get("state") != f"s{n}":
                    pass
                delays.append(time.perf_counter() - replied)
    return (f"delay from a write's reply (daemon A) to its event (watcher on daemon B), {writes} writes one at a "
            f"time: p50 {percentile(delays, 0.5) * 1000:.2f} ms, p99 {percentile(delays, 0.99) * 1000:.2f} ms")


async def expiry_lag(socket_path: str, runs: int) -> str:
    from statefuld_client import AsyncClient

    lags = []
    async with AsyncClient(socket_path) as client:
        watch = await client.watch_links(NS, "expiring")
        async with watch:
            for n in range(runs):
                await client.set_linked_pod(NS, f"e{n}", "expiring", 1, 1)
                ends = time.perf_counter() + 1.0
                while (event := await watch.__anext__())["cause"] != "expired":
                    pass
                lags.append(time.perf_counter() - ends)
                assert event["uid"] == f"e{n}"
    return (f"expiry lag, TTL end to the 'expired' event, {runs} links of 1 s: median "
            f"{statistics.median(lags) * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms")


def _writer(redis_socket: str, stop_at: float, index: int) -> None:
    import redis

    r = redis.Redis(unix_socket_path=redis_socket)
    n = 0
    while time.time() < stop_at:
        with r.pipeline(transaction=False) as pipe:
            for _ in range(100):
                pipe.set(f"sf:{{{NS}:lk:w{index}-{n % 5000}}}{SERVICE}", str(n % 16))
                n += 1
            pipe.execute()


async def flood(daemon_socket: str, redis_socket: str, watchers: int, seconds: float) -> str:
    from statefuld_client import AsyncClient

    clients = [AsyncClient(daemon_socket) for _ in range(watchers)]
    watches = [await c.watch_links(NS, SERVICE) for c in clients]
    counts = [0] * watchers
    gaps = [0] * watchers
    stop = asyncio.Event()

    async def drain(i: int) -> None:
        while not stop.is_set():
            try:
                event = await asyncio.wait_for(watches[i].__anext__(), 1.0)
            except TimeoutError:
                continue
            if event["kind"] == "gap":
                gaps[i] += 1
            else:
                counts[i] += 1

    tasks = [asyncio.create_task(drain(i)) for i in range(watchers)]
    ctx = multiprocessing.get_context("fork")
    stop_at = time.time() + seconds
    procs = [ctx.Process(target=_writer, args=(redis_socket, stop_at, i)) for i in range(2)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    await asyncio.to_thread(lambda: [p.join() for p in procs])
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1.0)  # the tail
    stop.set()
    await asyncio.gather(*tasks)
    for w, c in zip(watches, clients, strict=True):
        await w.aclose()
        await c.aclose()
    rate = statistics.median(counts) / elapsed
    return (f"{watchers} watchers of a service's links, 2 writers at full speed for {elapsed:.1f} s: "
            f"{rate:,.0f} events/s delivered to each (median), {sum(gaps)} gaps in all")


async def poll_or_watch(daemon_socket: str, redis: Any, seconds: float) -> list[str]:
    from statefuld_client import AsyncClient

    lines = []
    async with AsyncClient(daemon_socket) as client:
        for pod in range(100):
            await client.set_service_state(NS, "hundred", pod, "Ready")

        async def changes(stop_at: float) -> None:
            n = 0
            while time.monotonic() < stop_at:
                await client.set_service_state(NS, "hundred", n % 100, "Ready" if n % 2 else "Draining")
                n += 1
                await asyncio.sleep(1.0)

        def measure() -> tuple[int, int]:
            stats = redis.info("stats")
            return int(stats["total_commands_processed"]), int(stats["total_net_output_bytes"])

        for how in ("polling every 100 ms", "watching"):
            before = measure()
            stop_at = time.monotonic() + seconds
            changer = asyncio.create_task(changes(stop_at))
            if how == "watching":
                watch = await client.watch_service(NS, "hundred")
                async with watch:
                    while time.monotonic() < stop_at:
                        try:
                            await asyncio.wait_for(watch.__anext__(), max(0.01, stop_at - time.monotonic()))
                        except TimeoutError:
                            break
            else:
                while time.monotonic() < stop_at:
                    await client.get_service_state(NS, "hundred")
                    await asyncio.sleep(0.1)
            await changer
            after = measure()
            # Minus the changes' own commands (one HSET a second) and the two INFO calls.
            commands = after[0] - before[0] - int(seconds) - 2
            lines.append(f"a gateway {how}, service of 100 pods, one change a second: "
                         f"{commands / seconds:.1f} Redis commands/s, {(after[1] - before[1]) / seconds / 1024:.1f} "
                         f"KiB/s out of Redis")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--expiries", type=int, default=20)
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--poll-s", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with running(RedisServer()) as server, running(Daemon(server.url)) as a, running(Daemon(server.url)) as b:
        lines = [asyncio.run(delay(a.socket_path, b.socket_path, args.writes)),
                 asyncio.run(expiry_lag(b.socket_path, args.expiries))]
        for watchers in (10, 100):
            lines.append(asyncio.run(flood(b.socket_path, server.socket_path, watchers, args.flood_s)))
        lines += asyncio.run(poll_or_watch(b.socket_path, server.client(), args.poll_s))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
