"""A plain Python sidecar that only translates: a reference point for the benchmark, not a product.

A uvloop process that serves get_linked_pod and set_linked_pod over MessagePack-RPC on a Unix
socket and does nothing but translate: each request becomes the executor's command (GET of the
link key, EVALSHA of the daemon's set_linked_pod script), queued on one multiplexed Redis
connection and written once per loop turn; hiredis parses the replies, which are matched in order
and written back to each client once per read. No argument checks, deadlines, metrics, overload
or flow control, error mapping, reconnects or NOSCRIPT handling: everything statefuld adds is
missing, so what the same AsyncClient reaches through it is what the design reaches on the
machine at hand without any of the contract's work (benchmarks/run.py's "floor sidecar" rows,
docs/BENCHMARKS.md). run.py runs it interpreted, which bounds an interpreted statefuld only;
ceiling.py also runs it compiled by mypyc, as statefuld's hot path is (the casts on
hiredis.pack_command's argument are for mypyc, which enforces hiredis's stub).

Run by run.py: floor_sidecar.py SOCKET REDIS_SOCKET SET_LINKED_POD_SHA; prints "ready" once serving.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any, cast

import hiredis
import msgpack
import uvloop
from workloads import link_key, links_hash_key


class RedisConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[Client, int]] = deque()
        self.out: list[bytes] = []
        self.scheduled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes, client: Client, msgid: int) -> None:
        self.out.append(command)
        self.waiting.append((client, msgid))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        assert self.transport is not None
        self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        answered = set()
        while (reply := self.reader.gets()) is not False:
            client, msgid = self.waiting.popleft()
            client.out.append(client.packer.pack([1, msgid, None, None if reply is None else int(reply)]))
            answered.add(client)
        for client in answered:
            client.flush()


class Client(asyncio.Protocol):
    def __init__(self, redis: RedisConnection, sha: str) -> None:
        self.redis = redis
        self.sha = sha
        self.unpacker = msgpack.Unpacker()
        self.packer = msgpack.Packer()
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        send = self.redis.send
        for _, msgid, method, params in self.unpacker:
            uid, service = params[1], params[2]
            key = link_key(uid)
            if method == "get_linked_pod":
                send(hiredis.pack_command(cast(Any, ("GET", key))), self, msgid)
            else:  # set_linked_pod: the executor's own script and arguments
                send(hiredis.pack_command(cast(Any, ("EVALSHA", self.sha, 2, links_hash_key(uid), key, service,
                                                     params[3], params[4]))), self, msgid)

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(socket_path: str, redis_socket: str, sha: str) -> None:
    loop = asyncio.get_running_loop()
    _, redis = await loop.create_unix_connection(RedisConnection, redis_socket)
    server: Any = await loop.create_unix_server(lambda: Client(redis, sha), socket_path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(*sys.argv[1:4]))
