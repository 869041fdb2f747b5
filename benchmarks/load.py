"""Load generators: N processes x M concurrent callers for a fixed window, after a warm-up.

Every process warms up, then all start measuring together (a multiprocessing barrier, while
their callers keep running, so the window opens on a loaded system), count the calls that
complete inside the window, and send back the count, the window's length and each call's
latency. A row's figure is then the sum of the processes' rates; p50/p99 are over all calls.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import statistics
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# A load spec builds, inside the worker process, a caller factory: (process index) -> an
# async setup returning (call, close); call(caller_index, iteration) performs one operation.
AsyncCall = Callable[[int, int], Awaitable[Any]]
AsyncSetup = Callable[[int], Awaitable[tuple[AsyncCall, Callable[[], Awaitable[None]]]]]
SyncCall = Callable[[int], Any]
SyncSetup = Callable[[], tuple[SyncCall, Callable[[], None]]]


@dataclass
class Sample:
    ops_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    client_cpu_us: float  # CPU time of the load processes per call (microseconds)
    # CPU time per call of the process serving the calls (the daemon), within the window; NaN if
    # none was named.
    server_cpu_us: float = float("nan")


def percentile(sorted_values: array[float] | list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _summarize(parts: list[tuple[int, float, float, bytes]]) -> Sample:
    latencies: list[float] = []
    ops_s = 0.0
    calls = 0
    cpu_s = 0.0
    for count, elapsed_s, process_cpu_s, raw in parts:
        ops_s += count / elapsed_s
        calls += count
        cpu_s += process_cpu_s
        values = array("d")
        values.frombytes(raw)
        latencies.extend(values)
    latencies.sort()
    return Sample(ops_s, percentile(latencies, 0.50) * 1e3, percentile(latencies, 0.99) * 1e3, calls,
                  cpu_s / max(calls, 1) * 1e6)


async def _async_window(setup: AsyncSetup, process_index: int, callers: int, warmup_s: float, duration_s: float,
                        barrier: Any) -> tuple[int, float, bytes]:
    call, close = await setup(process_index)
    measuring = False
    stopping = False
    latencies = array("d")
    count = 0
    errors: list[BaseException] = []
    clock = time.perf_counter

    async def caller(index: int) -> None:
        nonlocal count
        iteration = 0
        while not stopping:
            start = clock()
            try:
                await call(index, iteration)
            except Exception as exc:  # a benchmark with errors is not a figure: reported and raised
                errors.append(exc)
                return
            if measuring:
                latencies.append(clock() - start)
                count += 1
            iteration += 1

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(warmup_s)
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    measuring = True
    started = clock()
    cpu_started = time.process_time()
    await asyncio.sleep(duration_s)
    measuring = False
    elapsed = clock() - started
    cpu = time.process_time() - cpu_started
    stopping = True
    await asyncio.gather(*tasks)
    await close()
    if errors:
        raise RuntimeError(f"{len(errors)} callers failed, first: {errors[0]!r}") from errors[0]
    return count, elapsed, cpu, latencies.tobytes()


def _async_worker(setup: AsyncSetup, process_index: int, callers: int, warmup_s: float, duration_s: float,
                  barrier: Any, out: multiprocessing.connection.Connection) -> None:
    try:
        window = _async_window(setup, process_index, callers, warmup_s, duration_s, barrier)
        # The application processes' event loop, the same for every row: asyncio's own by default
        # (what an application gets unless it opts in); SFD_BENCH_LOOP=uvloop runs every
        # row, statefuld's and redis-py's alike, on uvloop (docs/BENCHMARKS.md says which the table used).
        if os.environ.get("SFD_BENCH_LOOP", "asyncio") == "uvloop":
            import uvloop

            result = uvloop.run(window)
        else:
            result = asyncio.run(window)
        out.send(("ok", result))
    except BaseException as exc:
        barrier.abort()
        out.send(("error", repr(exc)))
    finally:
        out.close()


def _sync_worker(setup: SyncSetup, warmup_s: float, duration_s: float, barrier: Any,
                 out: multiprocessing.connection.Connection) -> None:
    try:
        call, close = setup()
        clock = time.perf_counter
        latencies = array("d")
        iteration = 0
        until = clock() + warmup_s
        while clock() < until:
            call(iteration)
            iteration += 1
        barrier.wait()
        started = clock()
        cpu_started = time.process_time()
        until = started + duration_s
        append = latencies.append
        while True:
            start = clock()
            call(iteration)
            end = clock()
            append(end - start)
            iteration += 1
            if end >= until:
                break
        elapsed = clock() - started
        cpu = time.process_time() - cpu_started
        close()
        out.send(("ok", (len(latencies), elapsed, cpu, latencies.tobytes())))
    except BaseException as exc:
        barrier.abort()
        out.send(("error", repr(exc)))
    finally:
        out.close()


def cpu_s(pid: int) -> float:
    """CPU seconds a process (all its threads) has run so far.

    From the scheduler's own runtime (/proc/<pid>/task/*/schedstat, nanoseconds), not utime +
    stime: those are sampled at the clock tick, and on this page's VMs they charged a daemon
    answering one blocking caller more CPU per call than the call's whole latency.
    """
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total_ns / 1e9


def _collect(targets: list[tuple[Callable[..., None], tuple[Any, ...]]], barrier: Any,
             timeout_s: float, server_pid: int | None = None, duration_s: float = 0.0) -> Sample:
    ctx = multiprocessing.get_context("fork")
    procs = []
    pipes = []
    for target, args in targets:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, barrier, sender), daemon=True)
        proc.start()
        sender.close()
        procs.append(proc)
        pipes.append(receiver)
    server_cpu = float("nan")
    if server_pid is not None:
        # This process is the barrier's last party: the window opens when it passes, and the
        # server's CPU is read at both ends of the window (the scheduler's runtime, cpu_s).
        try:
            barrier.wait(timeout=timeout_s)
        except threading.BrokenBarrierError:
            pass  # a load process failed: its pipe says why, below
        else:
            before = cpu_s(server_pid)
            time.sleep(duration_s)
            server_cpu = cpu_s(server_pid) - before
    parts = []
    failures = []
    for receiver in pipes:
        if not receiver.poll(timeout_s):
            failures.append("a load process did not finish in time")
            continue
        status, payload = receiver.recv()
        if status == "ok":
            parts.append(payload)
        else:
            failures.append(payload)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if failures:
        raise RuntimeError("load failed: " + "; ".join(failures))
    sample = _summarize(parts)
    sample.server_cpu_us = server_cpu / max(sample.calls, 1) * 1e6
    return sample


def run_async(setup: AsyncSetup, processes: int, callers: int, warmup_s: float, duration_s: float,
              server_pid: int | None = None) -> Sample:
    """One window: `processes` processes, each with `callers` concurrent coroutines. With
    `server_pid`, the sample also has that process's CPU per call within the window."""
    barrier = multiprocessing.get_context("fork").Barrier(processes + (server_pid is not None))
    targets = [(_async_worker, (setup, i, callers, warmup_s, duration_s)) for i in range(processes)]
    return _collect(targets, barrier, warmup_s + duration_s + 60, server_pid, duration_s)


def run_sync(setup: SyncSetup, warmup_s: float, duration_s: float, server_pid: int | None = None) -> Sample:
    """One window of one blocking caller in its own process (`server_pid`: as for run_async)."""
    barrier = multiprocessing.get_context("fork").Barrier(1 + (server_pid is not None))
    return _collect([(_sync_worker, (setup, warmup_s, duration_s))], barrier, warmup_s + duration_s + 60,
                    server_pid, duration_s)


@dataclass
class Row:
    """Medians over runs of one configuration."""

    samples: list[Sample]

    @property
    def ops_s(self) -> float:
        return statistics.median(s.ops_s for s in self.samples)

    @property
    def p50_ms(self) -> float:
        return statistics.median(s.p50_ms for s in self.samples)

    @property
    def p99_ms(self) -> float:
        return statistics.median(s.p99_ms for s in self.samples)
