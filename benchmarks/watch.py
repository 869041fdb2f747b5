"""Watch benchmarks (docs/BENCHMARKS.md, "Watch").

    .venv/bin/python benchmarks/watch.py [--writes 2000] [--flood-s 5] [--poll-s 10]

Starts a private redis-server on a Unix socket and two `statefuld serve` (this checkout) on it, then
measures:

- delay: a write through daemon A (its reply received) to its event at a watcher on daemon B,
  one write at a time on an idle machine: p50 and p99;
- expiry lag: a temporary link's TTL end to its "expired" event;
- sustained link changes: two writers change links for --flood-s seconds while 10,
  then 100, watchers (AsyncWatch, one connection each, in two processes) read every event, at a
  fixed rate of changes, several rates: events/s delivered per watcher and the gaps;
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


def _writer(redis_socket: str, stop_at: float, index: int, per_s: float) -> None:
    import redis

    r = redis.Redis(unix_socket_path=redis_socket)
    n = 0
    started = time.time()
    while time.time() < stop_at:
        with r.pipeline(transaction=False) as pipe:
            for _ in range(50):
                pipe.set(f"sf:{{{NS}:lk:w{index}-{n % 5000}}}{SERVICE}", str(n % 16))
                n += 1
            pipe.execute()
        ahead_s = n / per_s - (time.time() - started)
        if ahead_s > 0:
            time.sleep(ahead_s)


def _watchers(daemon_socket: str, count: int, seconds: float, ready: Any, out: Any) -> None:
    """``count`` watchers in this process, reading every event until the writers are done."""
    from statefuld_client import AsyncClient

    async def run() -> tuple[list[int], list[int]]:
        clients = [AsyncClient(daemon_socket) for _ in range(count)]
        watches = [await c.watch_links(NS, SERVICE) for c in clients]
        counts, gaps = [0] * count, [0] * count
        ready.wait()
        stop_at = time.monotonic() + seconds + 1.0  # and the tail

        async def drain(i: int) -> None:
            while time.monotonic() < stop_at:
                try:
                    event = await asyncio.wait_for(watches[i].__anext__(), max(0.01, stop_at - time.monotonic()))
                except TimeoutError:
                    return
                if event["kind"] == "gap":
                    gaps[i] += 1
                else:
                    counts[i] += 1

        await asyncio.gather(*(drain(i) for i in range(count)))
        for w, c in zip(watches, clients, strict=True):
            await w.aclose()
            await c.aclose()
        return counts, gaps

    out.send(asyncio.run(run()))


def flood(daemon_socket: str, redis_socket: str, watchers: int, per_s: float, seconds: float) -> tuple[float, int]:
    """Link changes at ``per_s`` a second for ``seconds``, watched by ``watchers`` spread over two
    processes: (events delivered per watcher a second, median; gaps in all)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(3)
    pipes, procs = [], []
    for half in (watchers // 2, watchers - watchers // 2):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_watchers, args=(daemon_socket, half, seconds, ready, sender))
        proc.start()
        pipes.append(receiver)
        procs.append(proc)
    ready.wait(timeout=60)
    stop_at = time.time() + seconds
    writers = [ctx.Process(target=_writer, args=(redis_socket, stop_at, i, per_s / 2)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    counts, gaps = [], 0
    for pipe in pipes:
        c, g = pipe.recv()
        counts += c
        gaps += sum(g)
    for proc in procs:
        proc.join()
    return statistics.median(counts) / seconds, gaps


def sustained(daemon_socket: str, redis_socket: str, seconds: float) -> list[str]:
    lines = []
    for watchers, rates in ((10, (1000, 2000, 4000, 8000)), (100, (250, 500, 1000, 2000))):
        for per_s in rates:
            delivered, gaps = flood(daemon_socket, redis_socket, watchers, per_s, seconds)
            lines.append(f"{watchers} watchers, link changes at {per_s:,}/s for {seconds:.0f} s: "
                         f"{delivered:,.0f} events/s delivered to each (median), {gaps} gaps")
    return lines


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

        for how in ("changing alone (the baseline: the changes, the daemons' health checks)",
                    "polling every 100 ms", "watching"):
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
            elif how.startswith("polling"):
                while time.monotonic() < stop_at:
                    await client.get_service_state(NS, "hundred")
                    await asyncio.sleep(0.1)
            else:
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            await changer
            after = measure()
            commands = after[0] - before[0]
            lines.append(f"{how}, service of 100 pods, one change a second: "
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
        lines += sustained(b.socket_path, server.socket_path, args.flood_s)
        lines += asyncio.run(poll_or_watch(b.socket_path, server.client(), args.poll_s))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
