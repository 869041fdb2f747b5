"""What a second hop costs one blocking caller, whatever the sidecar does with it (target 3).

    .venv/bin/python benchmarks/hop_floor.py [--runs 5] [--calls 20000]

One caller, one `GET` of a link key at a time, p50/p99 per row, rows interleaved in each round
and medians over rounds (docs/BENCHMARKS.md, "Target 3: the floor of a second hop"):

- redis-py blocking `GET` (target 3's baseline);
- the same `GET` as pre-encoded RESP bytes on a raw socket: one hop with no client cost at all;
- those bytes through a uvloop process that only forwards bytes (no parsing, no validation, no
  msgpack): the least any uvloop sidecar can cost, a second hop and nothing else;
- statefuld's blocking `Client.get_linked_pod`, which sends that same `GET` to Redis.

If the forwarder alone is past 1.2x redis-py, no sidecar written on this stack meets the target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import redis  # noqa: E402
from support import Daemon, RedisServer, running, short_tmpdir  # noqa: E402

from statefuld_client import Client  # noqa: E402

NS, SVC, UID = "bench", "lobby", "user-1"
KEY = f"sf:{{{NS}:lk:{UID}}}{SVC}"
REQUEST = f"*2\r\n$3\r\nGET\r\n${len(KEY)}\r\n{KEY}\r\n".encode()
REPLY = b"$1\r\n3\r\n"


def forward(listen_path: str, redis_path: str) -> None:
    """Run in a child process: accept connections on listen_path, pipe their bytes to Redis and back."""
    import uvloop

    class ToRedis(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.write(data)

    class FromClient(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer: list[bytes] = []
            self.redis: asyncio.Transport | None = None
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            self.redis, _ = await loop.create_unix_connection(lambda: ToRedis(self.transport), redis_path)  # type: ignore[arg-type]
            for data in self.buffer:
                self.redis.write(data)

        def data_received(self, data: bytes) -> None:
            if self.redis is None:
                self.buffer.append(data)
            else:
                self.redis.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_unix_server(FromClient, listen_path)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def raw_caller(path: str) -> Callable[[], object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buffer = bytearray(64)

    def call() -> object:
        sock.send(REQUEST)
        n = sock.recv_into(buffer)
        if bytes(buffer[:n]) != REPLY:
            raise AssertionError(bytes(buffer[:n]))
        return None

    return call


def measure(call: Callable[[], object], calls: int) -> tuple[float, float]:
    for _ in range(calls // 10):  # warm-up
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        started = clock()
        call()
        samples.append(clock() - started)
    samples.sort()
    return samples[len(samples) // 2] / 1e6, samples[len(samples) * 99 // 100] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()

    with running(RedisServer(extra_args=["--save", "", "--appendonly", "no"])) as server, \
            running(Daemon(server.url)) as daemon:
        server.client().set(KEY, 3)
        forwarder_path = os.path.join(short_tmpdir(), "forward.sock")
        forwarder = subprocess.Popen([sys.executable, "-c",
                                      f"import sys; sys.path.insert(0, {HERE!r}); import hop_floor; "
                                      f"hop_floor.forward({forwarder_path!r}, {server.socket_path!r})"])
        try:
            while not os.path.exists(forwarder_path):
                time.sleep(0.01)
            direct = redis.Redis(unix_socket_path=server.socket_path)
            client = Client(daemon.socket_path)
            rows: dict[str, Callable[[], object]] = {
                "redis-py blocking GET": lambda: direct.get(KEY),
                "raw socket GET, one hop": raw_caller(server.socket_path),
                "raw socket GET via a uvloop byte forwarder": raw_caller(forwarder_path),
                "statefuld Client.get_linked_pod": lambda: client.get_linked_pod(NS, UID, SVC),
            }
            assert client.get_linked_pod(NS, UID, SVC) == 3
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
            for _ in range(args.runs):
                for name, call in rows.items():
                    results[name].append(measure(call, args.calls))
        finally:
            forwarder.kill()
            forwarder.wait()

    base = [p50 for p50, _ in results["redis-py blocking GET"]]
    print(f"| one blocking caller, {args.calls:,} GETs per row and round, medians of {args.runs} rounds "
          f"| p50 ms | p99 ms | p50 vs redis-py (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    for name, samples in results.items():
        ratio = statistics.median(p50 / b for (p50, _), b in zip(samples, base, strict=True))
        print(f"| {name} | {statistics.median(s[0] for s in samples):.4f} "
              f"| {statistics.median(s[1] for s in samples):.4f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
