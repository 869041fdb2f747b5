"""Threads and the blocking Client: one Client shared by N threads against one Client per thread.

    .venv/bin/python benchmarks/threads.py [--threads 8] [--calls 10000] [--runs 5]

Starts its own redis-server and `statefuld serve`, then times --calls `get_linked_pod` calls made
by one thread, by --threads threads sharing one Client, and by --threads threads with a Client
each, interleaved over --runs rounds; prints the median wall time of each (docs/CLIENT.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from support import Daemon, RedisServer, running, short_tmpdir

from statefuld_client import Client


def timed(threads: int, calls: int, client_for: Callable[[int], Client]) -> float:
    per_thread = calls // threads

    def work(index: int) -> None:
        client = client_for(index)
        for i in range(per_thread):
            client.get_linked_pod("bench", f"user{i % 100}", "lobby")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with running(RedisServer(dir=short_tmpdir("sfb-"))) as redis_server, running(Daemon(redis_server.url)) as daemon:
        shared = Client(daemon.socket_path)
        own = [Client(daemon.socket_path) for _ in range(args.threads)]
        rows: dict[str, list[float]] = {"1 thread": [], f"{args.threads} threads, one shared Client": [],
                                        f"{args.threads} threads, a Client each": []}
        for _ in range(args.runs):
            rows["1 thread"].append(timed(1, args.calls, lambda i: shared))
            rows[f"{args.threads} threads, one shared Client"].append(timed(args.threads, args.calls, lambda i: shared))
            rows[f"{args.threads} threads, a Client each"].append(timed(args.threads, args.calls, lambda i: own[i]))
        for name, times in rows.items():
            print(f"{name}: {statistics.median(times):.2f} s for {args.calls} calls (runs: "
                  + ", ".join(f"{t:.2f}" for t in times) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
