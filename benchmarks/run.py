"""statefuld's benchmark: one command, its own Redis and daemon, every row of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/run.py [--runs 5] [--duration-s 2.5] [--markdown docs/BENCHMARKS.md]

Starts a private redis-server on a Unix socket and a `statefuld serve` on it, then measures, in
one run and interleaved (each round runs every row once, so the machine's drift hits all rows
alike), the median over --runs rounds of the rows below. The daemon is the compiled build, the one
the image ships (--build compiled, the default: scripts/build-compiled's wheel, installed in a
private directory); --build interpreted measures the checkout's .py files instead.

- get_linked_pod / set_linked_pod, P processes x 32 callers: statefuld (AsyncClient) against
  direct redis-py asyncio sending the very same commands to Redis (the executor's);
- the same at P x 128 callers against redis-benchmark's own unpipelined 50-client EVALSHA;
- one blocking caller: statefuld's Client against redis-py's blocking client, p50 and p99, with
  the daemon as configured and with a second daemon started with --busy-poll-us (default 50);
- a mixed workload: 89% get_linked_pod, 10% set_linked_pod, 1% batch_get_linked_pod of 100 uids;
- with the compiled build, the get/set rows also through a second daemon running the .py files
  (the interpreted build), to show what compiling buys;
- the same get/set rows through benchmarks/floor_sidecar.py, an interpreted sidecar that only
  translates: what the design reaches on the machine without the contract's work (checks,
  deadlines, counters), the reference statefuld's rows are read against;
- the daemon's RSS idle and its peak under load, and its time from start to answering
  `health` as ready with an external Redis.
"""

from __future__ import annotations

import argparse
import math
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
from workloads import SET_SCRIPT, Workload, refresh_pods, script_sha, seed, workloads  # noqa: E402


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


def compiled_build() -> tuple[dict[str, str], str]:
    """scripts/build-compiled's wheel installed (without its dependencies: this environment has
    them) in a private directory: the environment that runs it, and the directory to remove."""
    work = short_tmpdir("sfbc-")
    wheels, target = os.path.join(work, "wheels"), os.path.join(work, "site")
    print("building the compiled wheel ...", flush=True)
    subprocess.run([os.path.join(HERE, "..", "scripts", "build-compiled"), wheels], check=True, timeout=600)
    (wheel,) = [os.path.join(wheels, name) for name in os.listdir(wheels) if name.startswith("statefuld-")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", target, wheel], check=True, timeout=300)
    return {"PYTHONPATH": target}, work


def started_build(daemon: Daemon) -> str:
    """The build a started daemon runs, as its `stats` reports it (compiled, interpreted, mixed)."""
    error, stats = rpc_call(daemon.socket_path, "stats", [])
    if error is not None:
        raise RuntimeError(f"stats failed: {error}")
    return str(stats["build"])


def time_to_ready(redis_url: str, runs: int, env: dict[str, str]) -> tuple[float, float]:
    """Median seconds from spawning `statefuld serve` to `health` answering ready; and idle RSS (MB)."""
    times = []
    idle = float("nan")
    for _ in range(runs):
        daemon = Daemon(redis_url, env=env)
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


def start_floor_sidecar(redis_socket: str) -> tuple[subprocess.Popen[str], str]:
    """floor_sidecar.py on a private socket (the daemon has loaded the script it runs)."""
    socket_path = os.path.join(short_tmpdir("sff-"), "floor.sock")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "floor_sidecar.py"), socket_path, redis_socket,
                             script_sha(SET_SCRIPT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("floor_sidecar.py did not start")
    return proc, socket_path


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

    def ops(self, name: str) -> float:
        return statistics.median(s.ops_s for s in self.samples[name])

    def p50(self, name: str) -> float:
        return statistics.median(s.p50_ms for s in self.samples[name])

    def p99(self, name: str) -> float:
        return statistics.median(s.p99_ms for s in self.samples[name])


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
    """What the rows run against: the daemon, the floor sidecar, the busy-polling daemon (pids)."""

    daemon_pid: int
    loads: dict[str, Workload]
    floor_pid: int
    floor_loads: dict[str, Workload]
    polling_pid: int | None
    polled: dict[str, Workload] | None
    interpreted_pid: int | None  # the interpreted build beside the compiled one, or None
    interpreted: dict[str, Workload] | None


def measure_round(args: argparse.Namespace, served: Served, collected: Collected, daemon_socket: str,
                  round_: int) -> None:
    """One round of the concurrent rows, the daemon's RSS sampled meanwhile. Odd rounds run the
    rows in reverse order: a row that always ran first (after the blocking rows' idle machine)
    or last would carry that place's luck into every round."""
    P, C, CH = args.processes, args.callers, args.callers_high
    warmup_s, duration_s = args.warmup_s, args.duration_s

    def row(name: str, setup: AsyncSetup, callers: int, server_pid: int | None = None
            ) -> tuple[str, Callable[[], Sample]]:
        return name, lambda: run_async(setup, P, callers, warmup_s, duration_s, server_pid)

    def fresh_pods_then(name: str, setup: AsyncSetup, server_pid: int | None = None
                        ) -> tuple[str, Callable[[], Sample]]:
        def measure() -> Sample:
            refresh_pods(daemon_socket)  # reports must stay fresher than --load-stale-ms
            return run_async(setup, P, C, warmup_s, duration_s, server_pid)
        return name, measure

    rows: list[tuple[str, Callable[[], Sample]]] = []
    for op in ("get_linked_pod", "set_linked_pod", "mixed"):
        load = served.loads[op]
        rows += [row(f"{op} statefuld {P}x{C}", load.statefuld, C, served.daemon_pid),
                 row(f"{op} direct {P}x{C}", load.direct, C)]
        if op in served.floor_loads:
            rows.append(row(f"{op} floor sidecar {P}x{C}", served.floor_loads[op].statefuld, C, served.floor_pid))
    compute = served.loads["compute_linked_pod"]
    rows += [fresh_pods_then(f"compute_linked_pod statefuld {P}x{C}", compute.statefuld, served.daemon_pid),
             fresh_pods_then(f"compute_linked_pod direct {P}x{C}", compute.direct)]
    for op in ("get_linked_pod", "set_linked_pod"):
        rows += [row(f"{op} statefuld {P}x{CH}", served.loads[op].statefuld, CH, served.daemon_pid),
                 row(f"{op} floor sidecar {P}x{CH}", served.floor_loads[op].statefuld, CH, served.floor_pid)]
    if served.interpreted is not None:
        for op in ("get_linked_pod", "set_linked_pod"):
            for callers in (C, CH):
                rows.append(row(f"{op} statefuld interpreted {P}x{callers}", served.interpreted[op].statefuld,
                                callers, served.interpreted_pid))
    with RssSampler(served.daemon_pid) as sampler:
        for name, measure in rows if round_ % 2 == 0 else rows[::-1]:
            collected.add(name, measure())
    collected.load_rss_mb = max(collected.load_rss_mb, sampler.peak_mb)


def measure_blocking(args: argparse.Namespace, served: Served, collected: Collected) -> None:
    """One round of the one-blocking-caller rows."""
    for op in ("get_linked_pod", "set_linked_pod"):
        loads = served.loads[op]
        collected.add(f"{op} statefuld blocking 1",
                      run_sync(loads.statefuld_sync, args.warmup_s, args.duration_s, served.daemon_pid))
        collected.add(f"{op} direct blocking 1", run_sync(loads.direct_sync, args.warmup_s, args.duration_s))
        if served.polled is not None:
            collected.add(f"{op} statefuld blocking 1, --busy-poll-us {args.busy_poll_us}", run_sync(
                served.polled[op].statefuld_sync, args.warmup_s, args.duration_s, served.polling_pid))


def load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the rounds and their load, shared with ceiling.py."""
    parser.add_argument("--runs", type=int, default=5, help="rounds; figures are medians over them (5)")
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--duration-s", type=float, default=2.5, help="measured window of one row (2.5)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--callers-high", type=int, default=128)
    parser.add_argument("--benchmark-requests", type=int, default=300_000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load_arguments(parser)
    parser.add_argument("--daemon-arg", action="append", default=[], help="extra `statefuld serve` argument")
    parser.add_argument("--busy-poll-us", type=int, default=50,
                        help="the second daemon's --busy-poll-us, for the blocking rows (0: no such rows)")
    parser.add_argument("--build", choices=("compiled", "interpreted"), default="compiled",
                        help="the daemon measured: the compiled wheel (default) or the checkout's .py files")
    parser.add_argument("--markdown", help="also write the table to this file (between the RESULTS markers)")
    args = parser.parse_args()

    env, build_dir = compiled_build() if args.build == "compiled" else ({}, None)
    redis_server = RedisServer(dir=short_tmpdir("sfb-")).start()
    daemon: Daemon | None = None
    polling: Daemon | None = None
    interpreted: Daemon | None = None
    floor: subprocess.Popen[str] | None = None
    try:
        print("time to ready ...", flush=True)
        ready_s, idle_fresh_mb = time_to_ready(redis_server.url, args.runs, env)
        daemon = Daemon(redis_server.url, args=args.daemon_arg, env=env).start()
        assert daemon.proc is not None
        if started_build(daemon) != args.build:
            raise RuntimeError(f"asked for the {args.build} build, the daemon runs {started_build(daemon)}")
        seed(daemon.socket_path)
        time.sleep(0.5)
        idle_mb = rss_mb(daemon.proc.pid)
        loads = workloads(redis_server.socket_path, daemon.socket_path)
        floor, floor_socket = start_floor_sidecar(redis_server.socket_path)
        floor_loads = {op: load for op, load in workloads(redis_server.socket_path, floor_socket).items()
                       if op in ("get_linked_pod", "set_linked_pod")}
        polled = None
        if args.busy_poll_us:
            polling = Daemon(redis_server.url,
                             args=[*args.daemon_arg, "--busy-poll-us", str(args.busy_poll_us)], env=env).start()
            polled = workloads(redis_server.socket_path, polling.socket_path)
        interpreted_loads = None
        if args.build == "compiled":
            interpreted = Daemon(redis_server.url, args=args.daemon_arg).start()
            assert interpreted.proc is not None and started_build(interpreted) == "interpreted"
            interpreted_loads = workloads(redis_server.socket_path, interpreted.socket_path)
        served = Served(daemon.proc.pid, loads, floor.pid, floor_loads,
                        polling.proc.pid if polling is not None and polling.proc is not None else None, polled,
                        interpreted.proc.pid if interpreted is not None and interpreted.proc is not None else None,
                        interpreted_loads)
        collected = Collected()
        bench_command = loads["set_linked_pod"].benchmark_command
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
        for started in (daemon, polling, interpreted):
            if started is not None:
                started.cleanup()
        if floor is not None:
            floor.kill()
            floor.wait()
        redis_server.cleanup()
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
    return 0


def reference_rows(line: Callable[..., None], args: argparse.Namespace, bench: float) -> None:
    """The rows that put statefuld's in perspective: the floor sidecar's, and the interpreted build's."""
    P, C, CH = args.processes, args.callers, args.callers_high

    def rows(server: str, target_1: str, target_2: str) -> None:
        # One serving process's get/set rows: P x C against direct redis-py, P x CH against redis-benchmark.
        for op in ("get_linked_pod", "set_linked_pod"):
            line(f"{op} {server} {P}x{C}", f"{op} direct {P}x{C}", f"direct redis-py asyncio {P}x{C}", target_1)
        for op in ("get_linked_pod", "set_linked_pod"):
            line(f"{op} {server} {P}x{CH}", None, "redis-benchmark EVALSHA, 50 clients, -P 1", target_2,
                 base_ops=bench)

    # References for targets 1 and 2 on this machine: the same AsyncClient through an interpreted
    # sidecar that only translates (benchmarks/floor_sidecar.py).
    rows("floor sidecar", "reference for target 1", "reference for target 2")
    if args.build == "compiled":  # what compiling buys, side by side: the .py files' daemon
        rows("statefuld interpreted", "reported (interpreted build)", "reported (interpreted build)")


def report(c: Collected, args: argparse.Namespace, ready_s: float, idle_mb: float, idle_fresh_mb: float,
           bench_command: list[str]) -> str:
    P, C, CH = args.processes, args.callers, args.callers_high
    bench = statistics.median(c.benchmark_ops)
    rows = ["| workload | statefuld ops/s | p50 ms | p99 ms | baseline | baseline ops/s | p50 ms | p99 ms |"
            " ratio | target | met |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|"]
    spreads: list[str] = []

    def line(name: str, base_name: str | None, base_label: str, target: str, *, latency: bool = False,
             base_ops: float | None = None, goal: float | None = None) -> None:
        ops, p50, p99 = c.ops(name), c.p50(name), c.p99(name)
        # The ratio is the median of each round's ratio: the two rows of a round ran side by side,
        # so a noisy neighbour that slows a whole round cancels out of it.
        mine = c.samples[name]
        if base_name is not None:
            b_ops, b_p50, b_p99 = c.ops(base_name), c.p50(base_name), c.p99(base_name)
            base = c.samples[base_name]
            ratios = [(m.p50_ms / b.p50_ms) if latency else (m.ops_s / b.ops_s)
                      for m, b in zip(mine, base, strict=True)]
            base_cells = f"{b_ops:,.0f} | {b_p50:.3f} | {b_p99:.3f}"
        else:
            assert base_ops is not None
            ratios = [m.ops_s / b for m, b in zip(mine, c.benchmark_ops, strict=True)]
            base_cells = f"{base_ops:,.0f} | - | -"
        ratio = statistics.median(ratios)
        ratio_text = f"{ratio:.2f}x" + (" p50" if latency else "")
        met = "-" if goal is None else ("yes" if (ratio <= goal if latency else ratio >= goal) else "no")
        rows.append(f"| {name} | {ops:,.0f} | {p50:.3f} | {p99:.3f} | {base_label} | {base_cells} | {ratio_text} "
                    f"| {target} | {met} |")
        spreads.append(f"{name}: " + " / ".join(f"{r:.2f}" for r in ratios))

    for op in ("get_linked_pod", "set_linked_pod"):
        line(f"{op} statefuld {P}x{C}", f"{op} direct {P}x{C}", f"direct redis-py asyncio {P}x{C}", ">= 4x", goal=4.0)
    for op in ("get_linked_pod", "set_linked_pod"):
        line(f"{op} statefuld {P}x{CH}", None, "redis-benchmark EVALSHA, 50 clients, -P 1", ">= 1.2x",
             base_ops=bench, goal=1.2)
    for op in ("get_linked_pod", "set_linked_pod"):
        line(f"{op} statefuld blocking 1", f"{op} direct blocking 1", "redis-py blocking, 1 caller", "<= 1.2x p50",
             latency=True, goal=1.2)
        if args.busy_poll_us:
            line(f"{op} statefuld blocking 1, --busy-poll-us {args.busy_poll_us}", f"{op} direct blocking 1",
                 "redis-py blocking, 1 caller", "<= 1.2x p50", latency=True, goal=1.2)
    reference_rows(line, args, bench)
    line(f"mixed statefuld {P}x{C}", f"mixed direct {P}x{C}", f"direct redis-py asyncio {P}x{C}", "reported")
    line(f"compute_linked_pod statefuld {P}x{C}", f"compute_linked_pod direct {P}x{C}",
         f"the same 3 steps with redis-py asyncio {P}x{C}", "reported (new users)")
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    cpu = {name: statistics.median(s.client_cpu_us for s in samples) for name, samples in c.samples.items()}
    server_cpu = {name: statistics.median(s.server_cpu_us for s in samples) for name, samples in c.samples.items()
                  if not math.isnan(samples[0].server_cpu_us)}
    extra = [
        "",
        f"- daemon RSS: idle {idle_mb:.1f} MB after seeding ({idle_fresh_mb:.1f} MB fresh; target < 40 MB: "
        f"{met(idle_mb < 40)}), peak under load {c.load_rss_mb:.1f} MB (target < 80 MB: {met(c.load_rss_mb < 80)})",
        f"- time from `statefuld serve` to `health` ready, external Redis: median {ready_s * 1000:.0f} ms "
        f"(target <= 1 s: {met(ready_s <= 1.0)})",
        "- per-round ratios, to show the spread: " + "; ".join(spreads),
        "- CPU of the load processes per call (µs, median over rounds): "
        + ", ".join(f"{name} {us:.1f}" for name, us in cpu.items()),
        "- CPU of the serving process (the daemon, or the floor sidecar) per call within the window (µs, median "
        "over rounds): " + ", ".join(f"{name} {us:.1f}" for name, us in server_cpu.items()),
        "- statefuld's throughput as a share of the floor sidecar's, per round: " + "; ".join(
            f"{op} {callers}: " + " / ".join(f"{m.ops_s / f.ops_s:.2f}" for m, f in zip(
                c.samples[f"{op} statefuld {callers}"], c.samples[f"{op} floor sidecar {callers}"], strict=True))
            for callers in (f"{P}x{C}", f"{P}x{CH}") for op in ("get_linked_pod", "set_linked_pod")),
        f"- redis-benchmark command: `redis-benchmark -s SOCK -c 50 -n {args.benchmark_requests} -r 10000 -P 1 "
        f"{' '.join(bench_command)}` (median {bench:,.0f} ops/s)",
        f"- statefuld rows: the {args.build} build"
        + (" (scripts/build-compiled's wheel); the rows named interpreted: the .py files"
           if args.build == "compiled" else " (the checkout's .py files)"),
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

