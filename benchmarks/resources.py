"""The daemon's memory and CPU for docs/DEPLOYMENT.md, "Measured resource use".

    .venv/bin/python benchmarks/resources.py [--seconds 15] [--method ping]

Starts its own redis-server and `statefuld serve --log-level warning`; reads VmRSS 3 s after the
daemon is ready; then 64 connections each send pipelined batches of 16 requests of --method and
wait for the replies, for --seconds, while VmRSS is sampled every 250 ms; prints the idle RSS,
the peak, the requests per second, and the daemon's CPU (utime+stime) as a share of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import msgpack
from support import Daemon, MessageReader, RedisServer, rss_kib, running, short_tmpdir

PARAMS = {"ping": [], "get_linked_pod": ["bench", "user-1", "lobby"]}


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(path: str, method: str, seconds: float) -> int:
    batch = b"".join(msgpack.packb([0, i, method, PARAMS[method]]) for i in range(16))
    done = 0
    stop = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal done
        reader, writer = await asyncio.open_unix_connection(path)
        messages = MessageReader()
        while time.monotonic() < stop:
            writer.write(batch)
            got = 0
            while got < 16:
                got += len(messages.feed(await reader.read(65536)))
            done += 16
        writer.close()

    await asyncio.gather(*(connection() for _ in range(64)))
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--method", choices=sorted(PARAMS), default="ping")
    args = parser.parse_args()
    with running(RedisServer(dir=short_tmpdir("sfb-"))) as redis_server, \
            running(Daemon(redis_server.url, args=["--log-level", "warning"])) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        time.sleep(3)
        idle_kib = rss_kib(pid)
        peak_kib = idle_kib
        sampling = True

        def sample() -> None:
            nonlocal peak_kib
            while sampling:
                peak_kib = max(peak_kib, rss_kib(pid))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        cpu_before, started = cpu_s(pid), time.monotonic()
        requests = asyncio.run(load(daemon.socket_path, args.method, args.seconds))
        elapsed, cpu = time.monotonic() - started, cpu_s(pid) - cpu_before
        sampling = False
        sampler.join()
        print(f"idle VmRSS {idle_kib / 1024:.1f} MiB; under load ({args.method}, 64 connections x 16 pipelined): "
              f"{requests / elapsed:,.0f} requests/s, peak VmRSS {peak_kib / 1024:.1f} MiB, "
              f"CPU {cpu / elapsed:.2f} of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
