"""statefuld's benchmark: one command, its own Redis and daemons, every row of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/run.py [--runs 5] [--duration-s 2.5] [--markdown docs/BENCHMARKS.md]
    .venv/bin/python benchmarks/run.py --compare-python /tmp/old/.venv/bin/python --compare-label 8703c61

Starts a private redis-server on a Unix socket and a `statefuld serve` (this checkout) on it, then
measures, in one run and interleaved (each round runs every row once, odd rounds in reverse order,
so the machine's drift hits all rows alike), the median over --runs rounds of:

- get_linked_pod / set_linked_pod / a mixed workload, P processes x 32 callers: statefuld
  (AsyncClient) against direct redis-py asyncio sending the very same commands to Redis;
- compute_linked_pod for new users against the same steps done with redis-py;
- get/set at P x 128 callers against redis-benchmark's own unpipelined 50-client EVALSHA;
- one blocking caller: statefuld's Client against redis-py's blocking client, p50 and p99, also
  through a second daemon started with --busy-poll-us (default 50);
- with --compare-python: the get/set rows at P x 32 and P x 128 through a daemon run by that
  Python (another build or release of statefuld installed there), the same AsyncClient calling it;
- the daemon's RSS idle and its peak under load, and its time from start to `health` ready.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import redis  # noqa: E402
from load import AsyncSetup, Sample, run_async, run_sync  # noqa: E402
from support import Daemon, RedisServer, rpc_call, short_tmpdir  # noqa: E402
from workloads import Workload, refresh_pods, seed, workloads  # noqa: E402

OPS = ("get_linked_pod", "set_linked_pod")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Peak RSS of a process while the load runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class OtherDaemon(Daemon):
    """`statefuld serve` run by another Python environment (--compare-python)."""

    def __init__(self, python: str, redis_url: str) -> None:
        super().__init__(redis_url)
        self.python = python

    def command(self) -> list[str]:
        return [self.python, *super().command()[1:]]


def time_to_ready(redis_url: str, runs: int) -> tuple[float, float]:
    """Median seconds from spawning `statefuld serve` to `health` answering ready; and idle RSS (MB)."""
    times = []
    idle = float("nan")
    for _ in range(runs):
        daemon = Daemon(redis_url)
        started = time.perf_counter()
        daemon.start(wait=False)
        assert daemon.proc is not None
        try:
            while True:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {daemon.log()}")
                try:
                    error, result = rpc_call(daemon.socket_path, "health", [], timeout_s=1.0)
                    if error is None and result.get("ready"):
                        break
                except OSError:
                    pass
                time.sleep(0.002)
            times.append(time.perf_counter() - started)
            time.sleep(1.0)
            idle = rss_mb(daemon.proc.pid)
        finally:
            daemon.cleanup()
    return statistics.median(times), idle


def redis_benchmark(socket_path: str, command: list[str], clients: int, requests: int) -> float:
    """redis-benchmark's own ops/s for `command`, unpipelined (-P 1), `__rand_int__` over 10,000 uids."""
    binary = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    out = subprocess.run(
        [binary, "-s", socket_path, "-c", str(clients), "-n", str(requests), "-r", "10000", "-P", "1",
         "--csv", *command],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    # --csv: a header line, then "name","rps",...
    last = [line for line in out.splitlines() if line.strip()][-1]
    return float(re.findall(r'"([^"]*)"', last)[1])


@dataclass
class Collected:
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    benchmark_ops: list[float] = field(default_factory=list)
    load_rss_mb: float = 0.0

    def add(self, name: str, sample: Sample) -> None:
        self.samples.setdefault(name, []).append(sample)
        print(f"  {name}: {sample.ops_s:,.0f} ops/s p50 {sample.p50_ms:.3f} ms p99 {sample.p99_ms:.3f} ms",
              flush=True)

    def median(self, name: str, what: str) -> float:
        return statistics.median(getattr(s, what) for s in self.samples[name])


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    import hiredis
    import msgpack
    import uvloop

    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
            f"Redis {redis_version.removeprefix('v=')}, redis-py {redis.__version__}, hiredis {hiredis.__version__}, "
            f"uvloop {uvloop.__version__}, msgpack {'.'.join(map(str, msgpack.version))}")


@dataclass
class Served:
    """What the rows run against: each serving daemon's pid and workloads, by label."""

    loads: dict[str, Workload]  # this checkout's daemon; the direct rows come from here too
    daemon_pid: int
    polled: dict[str, Workload] | None = None
    polling_pid: int | None = None
    other: dict[str, Workload] | None = None
    other_pid: int | None = None


def measure_round(args: argparse.Namespace, served: Served, collected: Collected, daemon_socket: str,
                  round_: int) -> None:
    """One round of the concurrent rows, the daemon's RSS sampled meanwhile."""
    P, C, CH = args.processes, args.callers, args.callers_high

    def row(name: str, setup: AsyncSetup, callers: int, server_pid: int | None = None
            ) -> tuple[str, Callable[[], Sample]]:
        return name, lambda: run_async(setup, P, callers, args.warmup_s, args.duration_s, server_pid)

    def fresh_pods_then(name: str, setup: AsyncSetup, server_pid: int | None = None
                        ) -> tuple[str, Callable[[], Sample]]:
        def measure() -> Sample:
            refresh_pods(daemon_socket)  # reports must stay fresher than --load-stale-ms
            return run_async(setup, P, C, args.warmup_s, args.duration_s, server_pid)
        return name, measure

    rows: list[tuple[str, Callable[[], Sample]]] = []
    for op in (*OPS, "mixed"):
        rows += [row(f"{op} statefuld {P}x{C}", served.loads[op].statefuld, C, served.daemon_pid),
                 row(f"{op} direct {P}x{C}", served.loads[op].direct, C)]
    compute = served.loads["compute_linked_pod"]
    rows += [fresh_pods_then(f"compute_linked_pod statefuld {P}x{C}", compute.statefuld, served.daemon_pid),
             fresh_pods_then(f"compute_linked_pod direct {P}x{C}", compute.direct)]
    for op in OPS:
        rows.append(row(f"{op} statefuld {P}x{CH}", served.loads[op].statefuld, CH, served.daemon_pid))
        if served.other is not None:
            rows += [row(f"{op} {args.compare_label} {P}x{callers}", served.other[op].statefuld, callers,
                         served.other_pid) for callers in (C, CH)]
    with RssSampler(served.daemon_pid) as sampler:
        for name, measure in rows if round_ % 2 == 0 else rows[::-1]:
            collected.add(name, measure())
    collected.load_rss_mb = max(collected.load_rss_mb, sampler.peak_mb)


def measure_blocking(args: argparse.Namespace, served: Served, collected: Collected) -> None:
    """One round of the one-blocking-caller rows."""
    for op in OPS:
        loads = served.loads[op]
        collected.add(f"{op} statefuld blocking 1",
                      run_sync(loads.statefuld_sync, args.warmup_s, args.duration_s, served.daemon_pid))
        collected.add(f"{op} direct blocking 1", run_sync(loads.direct_sync, args.warmup_s, args.duration_s))
        if served.polled is not None:
            collected.add(f"{op} statefuld blocking 1, --busy-poll-us {args.busy_poll_us}", run_sync(
                served.polled[op].statefuld_sync, args.warmup_s, args.duration_s, served.polling_pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds; figures are medians over them (5)")
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--duration-s", type=float, default=2.5, help="measured window of one row (2.5)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--callers-high", type=int, default=128)
    parser.add_argument("--benchmark-requests", type=int, default=300_000)
    parser.add_argument("--busy-poll-us", type=int, default=50,
                        help="the second daemon's --busy-poll-us, for the blocking rows (0: no such rows)")
    parser.add_argument("--compare-python", help="a Python whose environment has another statefuld installed: "
                        "its daemon's get/set rows run beside this checkout's")
    parser.add_argument("--compare-label", default="other", help="the name of those rows")
    parser.add_argument("--markdown", help="also write the table to this file (between the RESULTS markers)")
    args = parser.parse_args()

    redis_server = RedisServer(dir=short_tmpdir("sfb-")).start()
    started: list[Daemon] = []
    try:
        print("time to ready ...", flush=True)
        ready_s, idle_fresh_mb = time_to_ready(redis_server.url, args.runs)
        daemon = Daemon(redis_server.url).start()
        started.append(daemon)
        assert daemon.proc is not None
        seed(daemon.socket_path)
        time.sleep(0.5)
        idle_mb = rss_mb(daemon.proc.pid)
        served = Served(workloads(redis_server.socket_path, daemon.socket_path), daemon.proc.pid)
        if args.busy_poll_us:
            polling = Daemon(redis_server.url, args=["--busy-poll-us", str(args.busy_poll_us)]).start()
            started.append(polling)
            assert polling.proc is not None
            served.polled = workloads(redis_server.socket_path, polling.socket_path)
            served.polling_pid = polling.proc.pid
        if args.compare_python:
            other = OtherDaemon(args.compare_python, redis_server.url).start()
            started.append(other)
            assert other.proc is not None
            served.other = workloads(redis_server.socket_path, other.socket_path)
            served.other_pid = other.proc.pid
        collected = Collected()
        bench_command = served.loads["set_linked_pod"].benchmark_command
        for round_ in range(args.runs):
            print(f"round {round_ + 1}/{args.runs}", flush=True)
            measure_round(args, served, collected, daemon.socket_path, round_)
            ops = redis_benchmark(redis_server.socket_path, bench_command, 50, args.benchmark_requests)
            collected.benchmark_ops.append(ops)
            print(f"  redis-benchmark 50 clients: {ops:,.0f} ops/s", flush=True)
            measure_blocking(args, served, collected)
        text = report(collected, args, ready_s, idle_mb, idle_fresh_mb, bench_command)
        print(text)
        if args.markdown:
            write_markdown(args.markdown, text)
    finally:
        for process in started:
            process.cleanup()
        redis_server.cleanup()
    return 0


def report(c: Collected, args: argparse.Namespace, ready_s: float, idle_mb: float, idle_fresh_mb: float,
           bench_command: list[str]) -> str:
    P, C, CH = args.processes, args.callers, args.callers_high
    bench = statistics.median(c.benchmark_ops)
    rows = ["| workload | statefuld ops/s | p50 ms | p99 ms | against | its ops/s | p50 ms | p99 ms | ratio |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    spreads: list[str] = []

    def line(name: str, base_name: str | None, base_label: str, *, latency: bool = False) -> None:
        ops, p50, p99 = (c.median(name, what) for what in ("ops_s", "p50_ms", "p99_ms"))
        # The ratio is the median of each round's ratio: the two rows of a round ran side by side,
        # so a noisy neighbour that slows a whole round cancels out of it.
        mine = c.samples[name]
        if base_name is not None:
            base = c.samples[base_name]
            ratios = [(m.p50_ms / b.p50_ms) if latency else (m.ops_s / b.ops_s)
                      for m, b in zip(mine, base, strict=True)]
            base_cells = (f"{c.median(base_name, 'ops_s'):,.0f} | {c.median(base_name, 'p50_ms'):.3f} | "
                          f"{c.median(base_name, 'p99_ms'):.3f}")
        else:
            ratios = [m.ops_s / b for m, b in zip(mine, c.benchmark_ops, strict=True)]
            base_cells = f"{bench:,.0f} | - | -"
        ratio = statistics.median(ratios)
        rows.append(f"| {name} | {ops:,.0f} | {p50:.3f} | {p99:.3f} | {base_label} | {base_cells} | "
                    f"{ratio:.2f}x{' p50' if latency else ''} |")
        spreads.append(f"{name}: " + " / ".join(f"{r:.2f}" for r in ratios))

    for op in (*OPS, "mixed"):
        line(f"{op} statefuld {P}x{C}", f"{op} direct {P}x{C}", f"redis-py asyncio {P}x{C}")
    line(f"compute_linked_pod statefuld {P}x{C}", f"compute_linked_pod direct {P}x{C}",
         f"its 3 steps with redis-py asyncio {P}x{C}")
    for op in OPS:
        line(f"{op} statefuld {P}x{CH}", None, "redis-benchmark EVALSHA, 50 clients")
    for op in OPS:
        line(f"{op} statefuld blocking 1", f"{op} direct blocking 1", "redis-py blocking, 1 caller", latency=True)
        if args.busy_poll_us:
            line(f"{op} statefuld blocking 1, --busy-poll-us {args.busy_poll_us}", f"{op} direct blocking 1",
                 "redis-py blocking, 1 caller", latency=True)
    if args.compare_python:
        for op in OPS:
            for callers in (C, CH):
                line(f"{op} statefuld {P}x{callers}", f"{op} {args.compare_label} {P}x{callers}",
                     f"{args.compare_label} {P}x{callers}")
    extra = [
        "",
        f"- daemon RSS: idle {idle_mb:.1f} MB after seeding ({idle_fresh_mb:.1f} MB fresh), "
        f"peak under load {c.load_rss_mb:.1f} MB",
        f"- time from `statefuld serve` to `health` ready, external Redis: median {ready_s * 1000:.0f} ms",
        "- CPU of the daemon per call within the window (µs, median over rounds): " + ", ".join(
            f"{name} {statistics.median(s.server_cpu_us for s in samples):.1f}"
            for name, samples in c.samples.items() if not any(s.server_cpu_us != s.server_cpu_us for s in samples)),
        "- per-round ratios, to show the spread: " + "; ".join(spreads),
        f"- redis-benchmark: `redis-benchmark -s SOCK -c 50 -n {args.benchmark_requests} -r 10000 -P 1 "
        f"{' '.join(bench_command)}`",
        f"- medians of {args.runs} rounds; each row {args.duration_s}s measured after {args.warmup_s}s warm-up",
        f"- machine: {machine()}",
    ]
    return "\n".join(rows + extra)


def write_markdown(path: str, text: str, markers: str = "RESULTS") -> None:
    """Put `text` between the file's `<!-- {markers} BEGIN/END -->` lines (added at the end if missing)."""
    begin, end = f"<!-- {markers} BEGIN -->", f"<!-- {markers} END -->"
    content = open(path).read() if os.path.exists(path) else f"{begin}\n{end}\n"
    if begin not in content:
        content += f"\n{begin}\n{end}\n"
    head, rest = content.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
