"""How far any sidecar could go on this machine: targets 1 and 2 against a sidecar written in C.

    .venv/bin/python benchmarks/ceiling.py [--runs 5] [--markdown docs/BENCHMARKS.md]

run.py's floor sidecar is interpreted Python, so it bounds a Python sidecar only. This runs the
same get_linked_pod / set_linked_pod load through benchmarks/floor_c.c, a C sidecar that only
translates (one epoll loop, one Redis connection written once per turn, no checks, deadlines or
counters: nothing of the contract's work), side by side with the compiled statefuld, direct
redis-py asyncio and redis-benchmark, every row once per round, odd rounds in reverse order:

- through the C sidecar with the project's AsyncClient: the most any sidecar gives this client;
- through the C sidecar with a floor client (`FloorClient` below: one asyncio connection, a future
  per call, one write per loop turn, no deadlines, checks or error mapping): the most any sidecar
  gives any asyncio client;
- through benchmarks/floor_sidecar.py compiled with mypyc (as statefuld's hot path is): the most
  a Python sidecar on this stack gives the AsyncClient, as far as that sidecar goes;
- statefuld (compiled, as the image ships it) with the AsyncClient.

If the C rows stay under a target, a sidecar that does more per call than that one does not meet
it on this machine with this client either, and the floor-client rows say whether a leaner
asyncio client would change that; if the Python floor's rows stay under it while the C rows pass,
the per-call cost of Python is what stands between.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any, cast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import msgpack  # noqa: E402
from load import AsyncSetup, Sample, run_async  # noqa: E402
from run import (  # noqa: E402
    Collected,
    compiled_build,
    load_arguments,
    machine,
    redis_benchmark,
    started_build,
    write_markdown,
)
from support import Daemon, RedisServer, short_tmpdir  # noqa: E402
from workloads import NS, PODS, SERVICE, SET_SCRIPT, script_sha, seed, uid, workloads  # noqa: E402

OPS = ("get_linked_pod", "set_linked_pod")
SERVERS = ("statefuld", "Python floor compiled, AsyncClient", "C sidecar, AsyncClient", "C sidecar, floor client")


class FloorClient(asyncio.Protocol):
    """The least an asyncio client can do per call: a future, a msgid, one write per loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.msgid = 0
        self.out: list[bytes] = []
        self.packer = msgpack.Packer()
        self.unpacker = msgpack.Unpacker()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for _, msgid, error, result in self.unpacker:
            future = self.futures.pop(msgid)
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(RuntimeError(f"error reply: {error}"))

    def call(self, method: str, params: list[Any]) -> asyncio.Future[Any]:
        self.msgid = msgid = (self.msgid + 1) & 0xFFFFFFFF
        future = self.loop.create_future()
        self.futures[msgid] = future
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(self.packer.pack([0, msgid, method, params]))
        return future

    def flush(self) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self.out))
        self.out.clear()


def floor_client_async(socket_path: str, op: str) -> AsyncSetup:
    async def setup(process: int) -> Any:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_unix_connection(lambda: FloorClient(loop), socket_path)

        async def get(caller: int, iteration: int) -> Any:
            return await client.call("get_linked_pod", [NS, uid(process, caller, iteration), SERVICE])

        async def set_(caller: int, iteration: int) -> Any:
            return await client.call("set_linked_pod",
                                     [NS, uid(process, caller, iteration), SERVICE, iteration % PODS, -1])

        async def close() -> None:
            transport.close()

        return (get if op == "get_linked_pod" else set_), close

    return setup


def build_floor_c(directory: str) -> str:
    binary = os.path.join(directory, "floor_c")
    compiler = os.environ.get("CC") or shutil.which("cc") or "gcc"
    subprocess.run([compiler, "-O2", "-o", binary, os.path.join(HERE, "floor_c.c")], check=True, timeout=120)
    return binary


def build_python_floor(directory: str) -> str:
    """floor_sidecar.py compiled by mypyc in `directory` (a copy: mypyc builds in place); its path."""
    for name in ("floor_sidecar.py", "workloads.py"):
        shutil.copy(os.path.join(HERE, name), directory)
    subprocess.run([sys.executable, "-m", "mypyc", "--ignore-missing-imports", "floor_sidecar.py"], cwd=directory,
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    os.remove(os.path.join(directory, "floor_sidecar.py"))  # so that the import takes the extension
    return directory


def start_server(command: list[str], redis_socket: str, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[str], str]:
    """A reference sidecar: `command SOCKET REDIS_SOCKET SHA`, which prints "ready" once serving."""
    socket_path = os.path.join(short_tmpdir("sfc-"), "floor.sock")
    proc = subprocess.Popen([*command, socket_path, redis_socket, script_sha(SET_SCRIPT)],
                            stdout=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{command} did not start")
    return proc, socket_path


def start_floor_c(binary: str, redis_socket: str) -> tuple[subprocess.Popen[str], str]:
    return start_server([binary], redis_socket)


def start_python_floor(directory: str, redis_socket: str) -> tuple[subprocess.Popen[str], str]:
    launch = "import sys, uvloop, floor_sidecar; uvloop.run(floor_sidecar.serve(*sys.argv[1:4]))"
    proc, socket_path = start_server([sys.executable, "-c", launch], redis_socket, {"PYTHONPATH": directory})
    return proc, socket_path


def check_same_answers(daemon_socket: str, floor_socket: str) -> None:
    """A reference sidecar must answer as statefuld does, or its rows measure something else."""
    from statefuld_client import AsyncClient

    async def compare() -> None:
        async with AsyncClient(daemon_socket) as daemon, AsyncClient(floor_socket) as floor:
            users = [uid(0, caller, 0) for caller in range(200)] + ["never-linked"]
            for user in users:
                expected = await daemon.get_linked_pod(NS, user, SERVICE)
                got = await floor.get_linked_pod(NS, user, SERVICE)
                if got != expected:
                    raise RuntimeError(f"the reference answered {got!r} for {user}, statefuld {expected!r}")
            previous = await daemon.get_linked_pod(NS, users[0], SERVICE)
            if await floor.set_linked_pod(NS, users[0], SERVICE, 5, -1) != previous or \
                    await daemon.get_linked_pod(NS, users[0], SERVICE) != 5:
                raise RuntimeError("the reference's set_linked_pod does not do what statefuld's does")
            if previous is not None:
                await daemon.set_linked_pod(NS, users[0], SERVICE, previous, -1)

    asyncio.run(compare())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load_arguments(parser)
    parser.add_argument("--build", choices=("compiled", "interpreted"), default="compiled",
                        help="the statefuld rows' daemon: the compiled wheel (default) or the .py files")
    parser.add_argument("--markdown", help="also write the table to this file (between the CEILING markers)")
    args = parser.parse_args()
    P, C, CH = args.processes, args.callers, args.callers_high

    env, build_dir = compiled_build() if args.build == "compiled" else ({}, None)
    work = short_tmpdir("sfcb-")
    redis_server = RedisServer(dir=short_tmpdir("sfb-")).start()
    daemon: Daemon | None = None
    servers: list[subprocess.Popen[str]] = []
    try:
        binary = build_floor_c(work)
        print("compiling floor_sidecar.py with mypyc ...", flush=True)
        python_floor_dir = build_python_floor(work)
        daemon = Daemon(redis_server.url, env=env).start()
        assert daemon.proc is not None
        if started_build(daemon) != args.build:
            raise RuntimeError(f"asked for the {args.build} build, the daemon runs {started_build(daemon)}")
        seed(daemon.socket_path)
        floor, floor_socket = start_floor_c(binary, redis_server.socket_path)
        servers.append(floor)
        python_floor, python_floor_socket = start_python_floor(python_floor_dir, redis_server.socket_path)
        servers.append(python_floor)
        for socket_path in (floor_socket, python_floor_socket):
            check_same_answers(daemon.socket_path, socket_path)
        loads = workloads(redis_server.socket_path, daemon.socket_path)
        through_c = workloads(redis_server.socket_path, floor_socket)
        through_python = workloads(redis_server.socket_path, python_floor_socket)

        rows: list[tuple[str, Callable[[], Sample]]] = []

        def row(name: str, setup: AsyncSetup, callers: int, server_pid: int | None) -> None:
            rows.append((name, lambda: run_async(setup, P, callers, args.warmup_s, args.duration_s, server_pid)))

        for op in OPS:
            row(f"{op} direct {P}x{C}", loads[op].direct, C, None)
            for callers in (C, CH):
                row(f"{op} statefuld {P}x{callers}", loads[op].statefuld, callers, daemon.proc.pid)
                row(f"{op} Python floor compiled, AsyncClient {P}x{callers}", through_python[op].statefuld, callers,
                    python_floor.pid)
                row(f"{op} C sidecar, AsyncClient {P}x{callers}", through_c[op].statefuld, callers, floor.pid)
                row(f"{op} C sidecar, floor client {P}x{callers}", floor_client_async(floor_socket, op), callers,
                    floor.pid)
        collected = Collected()
        bench_command = loads["set_linked_pod"].benchmark_command
        for round_ in range(args.runs):
            print(f"round {round_ + 1}/{args.runs}", flush=True)
            for name, measure in rows if round_ % 2 == 0 else rows[::-1]:
                collected.add(name, measure())
            ops = redis_benchmark(redis_server.socket_path, bench_command, 50, args.benchmark_requests)
            collected.benchmark_ops.append(ops)
            print(f"  redis-benchmark 50 clients: {ops:,.0f} ops/s", flush=True)
        text = report(collected, args)
        print(text)
        if args.markdown:
            write_markdown(args.markdown, text, "CEILING")
    finally:
        if daemon is not None:
            daemon.cleanup()
        for server in servers:
            server.kill()
            server.wait()
        redis_server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
    return 0


def report(c: Collected, args: argparse.Namespace) -> str:
    P, C, CH = args.processes, args.callers, args.callers_high
    bench = statistics.median(c.benchmark_ops)
    lines = ["| row | ops/s | p50 ms | p99 ms | against | ratio | target | serving process CPU/call µs "
             "| load CPU/call µs |", "|---|---:|---:|---:|---|---:|---|---:|---:|"]
    spreads = []

    def line(name: str, base: list[float], base_label: str, target: str) -> None:
        samples = c.samples[name]
        ratios = [s.ops_s / b for s, b in zip(samples, base, strict=True)]
        server = statistics.median(s.server_cpu_us for s in samples)
        load = statistics.median(s.client_cpu_us for s in samples)
        lines.append(f"| {name} | {c.ops(name):,.0f} | {c.p50(name):.3f} | {c.p99(name):.3f} | {base_label} "
                     f"| {statistics.median(ratios):.2f}x | {target} | {server:.1f} | {load:.1f} |")
        spreads.append(f"{name}: " + " / ".join(f"{r:.2f}" for r in ratios))

    for op in OPS:
        direct = [s.ops_s for s in c.samples[f"{op} direct {P}x{C}"]]
        for server in SERVERS:
            line(f"{op} {server} {P}x{C}", direct, f"direct redis-py asyncio {P}x{C}", ">= 4x (target 1)")
        for server in SERVERS:
            line(f"{op} {server} {P}x{CH}", c.benchmark_ops, "redis-benchmark EVALSHA, 50 clients, -P 1",
                 ">= 1.2x (target 2)")
    direct_cells = "; ".join(
        f"{op}: {c.ops(f'{op} direct {P}x{C}'):,.0f} ops/s, load CPU/call "
        f"{statistics.median(s.client_cpu_us for s in c.samples[f'{op} direct {P}x{C}']):.1f} µs" for op in OPS)
    extra = [
        "",
        f"- direct redis-py asyncio {P}x{C}: {direct_cells}",
        f"- redis-benchmark 50 clients, -P 1, the same EVALSHA: median {bench:,.0f} ops/s",
        "- per-round ratios: " + "; ".join(spreads),
        f"- statefuld rows: the {args.build} build; medians of {args.runs} rounds; each row {args.duration_s}s "
        f"measured after {args.warmup_s}s warm-up",
        f"- machine: {machine()}",
    ]
    return "\n".join(lines + extra)


if __name__ == "__main__":
    sys.exit(main())
