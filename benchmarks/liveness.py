"""Liveness and failover benchmarks (docs/BENCHMARKS.md, "Liveness and failover").

    .venv/bin/python benchmarks/liveness.py [--runs 5] [--duration-s 2.5] [--idle-s 60]

Starts a private redis-server on a Unix socket and a `statefuld serve` (this checkout) on it, then
measures:

- route_user for users whose pod is alive ("kept") against get_linked_pod, 2 processes x 32
  callers, interleaved rounds (odd rounds reversed), medians and their ratio;
- a failover storm: 10,000 users of a pod that went Down, routed by 2 processes x 32 callers,
  each user once: time until every user is moved, and Redis commands per moved user;
- the daemon's CPU while it holds one pod (--heartbeat-ms 1000) and nothing else happens.
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
sys.path.insert(0, HERE)

from load import AsyncSetup, cpu_s, run_async  # noqa: E402
from support import Daemon, RedisServer, running  # noqa: E402

NS, SERVICE = "bench", "lobby"
USERS = 10_000
PODS = 16
DEAD_POD = 99


def link_key(uid: str) -> str:
    return f"sf:{{{NS}:lk:{uid}}}{SERVICE}"


def user(process: int, caller: int, iteration: int) -> str:
    return f"user-{(process * 7919 + caller * 131 + iteration * 17) % USERS}"


def through_daemon(socket_path: str, method: str) -> AsyncSetup:
    async def setup(process: int) -> Any:
        from statefuld_client import AsyncClient

        client = AsyncClient(socket_path)
        call = getattr(client, method)
        extra = (-1,) if method == "route_user" else ()

        async def one(caller: int, iteration: int) -> Any:
            return await call(NS, user(process, caller, iteration), SERVICE, *extra)

        return one, client.aclose

    return setup


def seed_links(socket_path: str, pod_of: Any) -> None:
    from statefuld_client import AsyncClient

    async def run() -> None:
        async with AsyncClient(socket_path) as client:
            for start in range(0, USERS, 500):
                await asyncio.gather(*(client.set_linked_pod(NS, f"user-{i}", SERVICE, pod_of(i), -1)
                                       for i in range(start, min(USERS, start + 500))))

    asyncio.run(run())


def kept_against_get(socket_path: str, pid: int, runs: int, duration_s: float) -> list[str]:
    rows = {name: through_daemon(socket_path, name) for name in ("get_linked_pod", "route_user")}
    samples: dict[str, list[Any]] = {name: [] for name in rows}
    for round_index in range(runs):
        order = list(rows) if round_index % 2 == 0 else list(reversed(rows))
        for name in order:
            samples[name].append(run_async(rows[name], 2, 32, 0.5, duration_s, server_pid=pid))
    med = {name: statistics.median(s.ops_s for s in samples[name]) for name in rows}
    cpu = {name: statistics.median(s.server_cpu_us for s in samples[name]) for name in rows}
    p50 = {name: statistics.median(s.p50_ms for s in samples[name]) for name in rows}
    lines = ["| operation, 2x32 callers | ops/s (median) | p50 ms | daemon CPU µs/call |", "|---|---|---|---|"]
    for name in rows:
        lines.append(f"| {name} | {med[name]:,.0f} | {p50[name]:.3f} | {cpu[name]:.1f} |")
    # Ratios of the rows of one round (side by side), then their median, as benchmarks/run.py does.
    throughput = statistics.median(g.ops_s / r.ops_s for g, r in zip(samples["get_linked_pod"],
                                                                     samples["route_user"], strict=True))
    cpu_ratio = statistics.median(r.server_cpu_us / g.server_cpu_us for g, r in zip(samples["get_linked_pod"],
                                                                                   samples["route_user"],
                                                                                   strict=True))
    lines.append(f"\nroute_user (kept) costs {throughput:.2f}x get_linked_pod in throughput, {cpu_ratio:.2f}x in "
                 f"daemon CPU per call (medians of the per-round ratios).")
    return lines


def _storm_worker(socket_path: str, process: int, processes: int, barrier: Any, out: Any) -> None:
    from statefuld_client import AsyncClient

    async def run() -> int:
        mine = [f"user-{i}" for i in range(process, USERS, processes)]
        moved = 0
        async with AsyncClient(socket_path) as client:
            await client.ping()

            async def caller(index: int) -> None:
                nonlocal moved
                for uid in mine[index::32]:
                    if (await client.route_user(NS, uid, SERVICE, -1))["outcome"] == "moved":
                        moved += 1

            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            await asyncio.gather(*(caller(i) for i in range(32)))
        return moved

    out.send(asyncio.run(run()))


def storm(socket_path: str, redis_client: Any, runs: int) -> list[str]:
    from statefuld_client import Client

    times, per_user, sent_per_user = [], [], []
    for _ in range(runs):
        seed_links(socket_path, lambda i: DEAD_POD)
        with Client(socket_path) as client:
            client.set_service_state(NS, SERVICE, DEAD_POD, "Down")
            for pod in range(PODS):
                client.report_pod_load(NS, SERVICE, pod, 0)
        commands_before = int(redis_client.info("stats")["total_commands_processed"])
        sent_before = daemon_commands(socket_path)
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(3)
        pipes, procs = [], []
        for process in range(2):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_storm_worker, args=(socket_path, process, 2, barrier, sender))
            proc.start()
            pipes.append(receiver)
            procs.append(proc)
        barrier.wait(timeout=60)
        started = time.perf_counter()
        moved = sum(pipe.recv() for pipe in pipes)
        times.append(time.perf_counter() - started)
        for proc in procs:
            proc.join()
        # Minus the INFO call of this measurement itself.
        commands = int(redis_client.info("stats")["total_commands_processed"]) - commands_before - 1
        assert moved == USERS, f"{moved} of {USERS} moved"
        per_user.append(commands / USERS)
        sent_per_user.append((daemon_commands(socket_path) - sent_before) / USERS)
    return [f"failover storm: {USERS:,} users of a Down pod routed by 2x32 callers: every user moved in "
            f"{statistics.median(times):.2f} s (median of {runs}; {USERS / statistics.median(times):,.0f} "
            f"moves/s); per moved user the daemon sent {statistics.median(sent_per_user):.2f} commands (round "
            f"trips), which Redis counts as {statistics.median(per_user):.2f} with the scripts' own calls"]


def daemon_commands(socket_path: str) -> int:
    from statefuld_client import Client

    with Client(socket_path) as client:
        return int(client.call("stats")["redis"]["commands"])


def idle_hold(redis_url: str, idle_s: float) -> list[str]:
    from statefuld_client import Client

    with running(Daemon(redis_url, args=["--heartbeat-ms", "1000"])) as daemon:
        assert daemon.proc is not None
        with Client(daemon.socket_path) as client, client.hold_pod(NS, SERVICE, 1, "Ready", 0):
            time.sleep(2.0)  # past start-up's own work
            before, started = cpu_s(daemon.proc.pid), time.perf_counter()
            time.sleep(idle_s)
            used, elapsed = cpu_s(daemon.proc.pid) - before, time.perf_counter() - started
    return [f"one held pod, --heartbeat-ms 1000, nothing else: daemon CPU {used * 1000:.0f} ms over "
            f"{elapsed:.0f} s = {used / elapsed * 100:.3f}% of one core"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=2.5)
    parser.add_argument("--storm-runs", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--alive-cache-ms", type=int, default=None, help="the daemon's option (default: its own)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    daemon_args = [] if args.alive_cache_ms is None else ["--alive-cache-ms", str(args.alive_cache_ms)]
    with running(RedisServer()) as server, running(Daemon(server.url, args=daemon_args)) as daemon:
        assert daemon.proc is not None
        seed_links(daemon.socket_path, lambda i: i % PODS)
        from statefuld_client import Client

        with Client(daemon.socket_path) as client:
            holds = [client.hold_pod(NS, SERVICE, pod, "Ready", 0) for pod in range(PODS)]
            try:
                lines = kept_against_get(daemon.socket_path, daemon.proc.pid, args.runs, args.duration_s) \
                    if args.runs else []
                if args.storm_runs:
                    lines += ["", *storm(daemon.socket_path, server.client(), args.storm_runs)]
            finally:
                for hold in holds:
                    hold.close()
        if args.idle_s:
            lines += ["", *idle_hold(server.url, args.idle_s)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
