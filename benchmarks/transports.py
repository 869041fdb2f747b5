"""The daemon's hot-path options side by side: how one process gets many concurrent EVALSHAs to Redis.

Each option runs in its own process with the same callers (coroutines in that process, as the
daemon's request tasks are) on the same script and keys:

- redis-py per call: ``await redis.evalsha(...)`` on redis.asyncio with its connection pool;
- redis-py pipeline per turn: calls of one loop turn go out as one redis-py pipeline;
- statefuld.redis_mux: one multiplexed connection, one write per turn, hiredis.Reader;
- coredis (if importable, or found under --coredis-path): its own multiplexing client.

Run: .venv/bin/python benchmarks/transports.py [--callers 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
import redis.asyncio
from load import AsyncCall, Sample, run_async
from support import RedisServer

# A one-key script of the size of the link scripts: read the link, write it back with a TTL.
SCRIPT = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600)
return old
"""
KEYSPACE = 10_000


def key_of(process: int, caller: int, iteration: int) -> str:
    return f"sf:{{bench:lk:u{(process * 7919 + caller * 131 + iteration) % KEYSPACE}}}lobby"


class PipelinePerTurn:
    """Requests of one loop turn become one redis-py pipeline (the "pipeline object" prototype)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((args, future))
        return future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


def setup_for(option: str, socket_path: str, sha: str, coredis_path: str | None) -> Callable[[int], Awaitable[Any]]:
    async def setup(process: int) -> tuple[AsyncCall, Callable[[], Awaitable[None]]]:
        if option == "redis-py per call":
            client = redis.asyncio.Redis(unix_socket_path=socket_path, max_connections=1024)

            async def call(caller: int, iteration: int) -> Any:
                return await client.evalsha(sha, 1, key_of(process, caller, iteration), "7")

            return call, client.aclose
        if option == "redis-py pipeline per turn":
            client = redis.asyncio.Redis(unix_socket_path=socket_path, max_connections=1024)
            batcher = PipelinePerTurn(client)

            async def call(caller: int, iteration: int) -> Any:
                return await batcher.execute("EVALSHA", sha, 1, key_of(process, caller, iteration), "7")

            return call, client.aclose
        if option == "statefuld.redis_mux":
            from statefuld.redis_mux import Endpoint, RedisMux

            mux = RedisMux(Endpoint(path=socket_path))

            async def call(caller: int, iteration: int) -> Any:
                return await mux.execute("EVALSHA", sha, 1, key_of(process, caller, iteration), "7")

            return call, mux.close
        if option == "coredis":
            if coredis_path:
                sys.path.insert(0, coredis_path)
            import coredis

            cclient: Any = coredis.Redis(unix_socket_path=socket_path)
            await cclient.__aenter__()

            async def call(caller: int, iteration: int) -> Any:
                return await cclient.evalsha(sha, keys=[key_of(process, caller, iteration)], args=["7"])

            async def close() -> None:
                await cclient.__aexit__(None, None, None)

            return call, close
        raise ValueError(option)

    return setup  # type: ignore[return-value]


OPTIONS = ("redis-py per call", "redis-py pipeline per turn", "statefuld.redis_mux", "coredis")


def compare(socket_path: str, *, callers: int, runs: int, warmup_s: float, duration_s: float,
            coredis_path: str | None, options: tuple[str, ...] = OPTIONS) -> dict[str, list[Sample] | str]:
    with redis.Redis(unix_socket_path=socket_path) as r:
        sha = r.script_load(SCRIPT)
    results: dict[str, list[Sample] | str] = {option: [] for option in options}
    for _ in range(runs):  # interleaved, so drifting machine noise hits every option alike
        for option in options:
            samples = results[option]
            if isinstance(samples, str):
                continue
            try:
                samples.append(run_async(setup_for(option, socket_path, sha, coredis_path), 1, callers,
                                         warmup_s, duration_s))  # type: ignore[arg-type]
            except Exception as exc:
                results[option] = f"failed: {exc}"
    return results


def table(results: dict[str, list[Sample] | str], callers: int) -> str:
    lines = [f"| hot path (1 process, {callers} concurrent callers, one-key EVALSHA) | ops/s | p50 ms | p99 ms |"
             " vs per-call redis-py |", "|---|---:|---:|---:|---:|"]
    base_samples = results.get("redis-py per call")
    base = statistics.median(s.ops_s for s in base_samples) if isinstance(base_samples, list) else None
    for option, samples in results.items():
        if isinstance(samples, str) or not samples:
            lines.append(f"| {option} | {samples or 'not run'} | | | |")
            continue
        ops = statistics.median(s.ops_s for s in samples)
        ratio = f"{ops / base:.2f}x" if base else ""
        lines.append(f"| {option} | {ops:,.0f} | {statistics.median(s.p50_ms for s in samples):.3f} | "
                     f"{statistics.median(s.p99_ms for s in samples):.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, action="append", help="concurrent callers (repeatable; 64)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--coredis-path", default=os.environ.get("STATEFULD_BENCH_COREDIS_PATH"),
                        help="a pip --target directory holding coredis (kept out of the project's venv)")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        for callers in args.callers or [64]:
            results = compare(server.socket_path, callers=callers, runs=args.runs, warmup_s=args.warmup_s,
                              duration_s=args.duration_s, coredis_path=args.coredis_path)
            print(table(results, callers), flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
