"""The benchmark's operations, each two ways: through statefuld, and straight to Redis with redis-py.

"Straight to Redis" sends exactly the commands statefuld's executor sends for the operation (the
same keys, the same Lua script by SHA), so the comparison is of the paths, not of the work.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

NS = "bench"
SERVICE = "lobby"
PREFIX = "sf"
UIDS = 10_000
PODS = 16
BATCH = 100
STALE_MS = 10_000  # the daemon's default --load-stale-ms
GONE_MS = 30_000  # the daemon's default --gone-after-ms
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def uid(process: int, caller: int, iteration: int) -> str:
    # Spread over the key space, different per caller, cheap to compute.
    return f"user-{(process * 7919 + caller * 131 + iteration * 17) % UIDS}"


def new_uid(token: str, process: int, caller: int, iteration: int) -> str:
    # compute_linked_pod is measured for new users: every call names a user never seen before.
    return f"new-{token}-{process}-{caller}-{iteration}"


def state_key() -> str:
    return f"{PREFIX}:{{{NS}:state:{SERVICE}}}"


def load_key() -> str:
    return f"{PREFIX}:{{{NS}:state:{SERVICE}}}load"


def link_key(u: str) -> str:
    return f"{PREFIX}:{{{NS}:lk:{u}}}{SERVICE}"


def links_hash_key(u: str) -> str:
    return f"{PREFIX}:{{{NS}:lk:{u}}}"


def script_sha(name: str) -> str:
    # The daemon's own loader: the SHA of the script as the executor loads it (libraries prepended).
    from statefuld.scripts import load_scripts

    return load_scripts()[name].sha


def pod_of(reply: Any) -> int | None:
    return None if reply is None else int(reply)


# --- what the executor sends, per operation ------------------------------------------------------

def get_command(u: str) -> tuple[Any, ...]:
    return ("GET", link_key(u))


def set_command(sha: str, u: str, pod: int) -> tuple[Any, ...]:
    return ("EVALSHA", sha, 2, links_hash_key(u), link_key(u), SERVICE, pod, -1)


SET_SCRIPT = "set_linked_pod"


AsyncSetup = Callable[[int], Awaitable[tuple[Callable[[int, int], Awaitable[Any]], Callable[[], Awaitable[None]]]]]
SyncSetup = Callable[[], tuple[Callable[[int], Any], Callable[[], None]]]


@dataclass
class Workload:
    statefuld: AsyncSetup
    direct: AsyncSetup
    statefuld_sync: SyncSetup
    direct_sync: SyncSetup
    benchmark_command: list[str]


def _mixed_choice(caller: int, iteration: int) -> str:
    # Deterministic mix: of every 100 calls of a caller, 1 batch read, 10 writes, 89 reads.
    slot = (caller * 37 + iteration) % 100
    return "batch" if slot == 0 else "set" if slot <= 10 else "get"


def statefuld_async(daemon_socket: str, op: str) -> AsyncSetup:
    async def setup(process: int) -> Any:
        from statefuld_client import AsyncClient

        client = AsyncClient(daemon_socket)

        async def get(caller: int, iteration: int) -> Any:
            return await client.get_linked_pod(NS, uid(process, caller, iteration), SERVICE)

        async def set_(caller: int, iteration: int) -> Any:
            return await client.set_linked_pod(NS, uid(process, caller, iteration), SERVICE, iteration % PODS, -1)

        async def batch(caller: int, iteration: int) -> Any:
            uids = [uid(process, caller, iteration + i) for i in range(BATCH)]
            return await client.batch_get_linked_pod(NS, uids, SERVICE)

        async def mixed(caller: int, iteration: int) -> Any:
            kind = _mixed_choice(caller, iteration)
            return await (get if kind == "get" else set_ if kind == "set" else batch)(caller, iteration)

        token = os.urandom(4).hex()

        async def compute(caller: int, iteration: int) -> Any:
            return await client.compute_linked_pod(NS, new_uid(token, process, caller, iteration), SERVICE, -1)

        ops = {"get_linked_pod": get, "set_linked_pod": set_, "mixed": mixed, "compute_linked_pod": compute}
        return ops[op], client.aclose

    return setup


def direct_async(redis_socket: str, sha: str, op: str) -> AsyncSetup:
    async def setup(process: int) -> Any:
        # One pool per process, as an application would have; redis-py opens a connection per
        # concurrent caller and parses with hiredis.
        client = redis.asyncio.Redis(unix_socket_path=redis_socket, max_connections=1024)

        async def get(caller: int, iteration: int) -> Any:
            return pod_of(await client.execute_command(*get_command(uid(process, caller, iteration))))

        async def set_(caller: int, iteration: int) -> Any:
            return pod_of(await client.execute_command(
                *set_command(sha, uid(process, caller, iteration), iteration % PODS)))

        async def batch(caller: int, iteration: int) -> Any:
            # The executor's batch read on one Redis: a single MGET of the uids' link keys.
            uids = list(dict.fromkeys(uid(process, caller, iteration + i) for i in range(BATCH)))
            replies = await client.execute_command("MGET", *[link_key(u) for u in uids])
            result: dict[int, list[str]] = {}
            for u, reply in zip(uids, replies, strict=True):
                if reply is not None:
                    result.setdefault(int(reply), []).append(u)
            return result

        async def mixed(caller: int, iteration: int) -> Any:
            kind = _mixed_choice(caller, iteration)
            return await (get if kind == "get" else set_ if kind == "set" else batch)(caller, iteration)

        token = os.urandom(4).hex()
        pick_sha, replace_sha = script_sha("pick_pod"), script_sha("replace_linked_pod")

        async def compute(caller: int, iteration: int) -> Any:
            # What an application would do without the daemon: route_user's three steps itself
            # (read the link; judge its pod and pick; link only if the link is still as read).
            u = new_uid(token, process, caller, iteration)
            existing = await client.execute_command("GET", link_key(u))
            linked = b"" if existing is None else existing
            pod = await client.execute_command("EVALSHA", pick_sha, 2, state_key(), load_key(), linked, STALE_MS,
                                               GONE_MS, random.random(), random.random(), 1, "Ready", "Down")
            if pod == 0:
                return int(existing)
            if pod is None:
                return None
            written, current = await client.execute_command(
                "EVALSHA", replace_sha, 2, links_hash_key(u), link_key(u), SERVICE, linked, int(pod), -1)
            return int(pod) if written else pod_of(current)

        ops = {"get_linked_pod": get, "set_linked_pod": set_, "mixed": mixed, "compute_linked_pod": compute}
        return ops[op], client.aclose

    return setup


def statefuld_sync(daemon_socket: str, op: str) -> SyncSetup:
    def setup() -> Any:
        from statefuld_client import Client

        client = Client(daemon_socket)
        if op == "get_linked_pod":
            def call(iteration: int) -> Any:
                return client.get_linked_pod(NS, uid(0, 0, iteration), SERVICE)
        else:
            def call(iteration: int) -> Any:
                return client.set_linked_pod(NS, uid(0, 0, iteration), SERVICE, iteration % PODS, -1)
        return call, client.close

    return setup


def direct_sync(redis_socket: str, sha: str, op: str) -> SyncSetup:
    def setup() -> Any:
        client = redis.Redis(unix_socket_path=redis_socket)
        if op == "get_linked_pod":
            def call(iteration: int) -> Any:
                return pod_of(client.execute_command(*get_command(uid(0, 0, iteration))))
        else:
            def call(iteration: int) -> Any:
                return pod_of(client.execute_command(*set_command(sha, uid(0, 0, iteration), iteration % PODS)))
        return call, client.close

    return setup


def workloads(redis_socket: str, daemon_socket: str) -> dict[str, Workload]:
    sha = script_sha(SET_SCRIPT)
    bench_set = [str(a) for a in set_command(sha, "user-__rand_int__", 3)]
    return {
        op: Workload(statefuld_async(daemon_socket, op), direct_async(redis_socket, sha, op),
                     statefuld_sync(daemon_socket, op), direct_sync(redis_socket, sha, op), bench_set)
        for op in ("get_linked_pod", "set_linked_pod", "mixed", "compute_linked_pod")
    }


def seed(daemon_socket: str) -> None:
    """Link every benchmark uid (through the daemon, so the layout is the executor's) and load scripts."""
    from statefuld_client import AsyncClient

    async def run() -> None:
        async with AsyncClient(daemon_socket) as client:
            for start in range(0, UIDS, 500):
                await asyncio.gather(*(client.set_linked_pod(NS, f"user-{i}", SERVICE, i % PODS, -1)
                                       for i in range(start, min(UIDS, start + 500))))

    asyncio.run(run())
    refresh_pods(daemon_socket)


def refresh_pods(daemon_socket: str) -> None:
    """Every pod Ready with a fresh load report of 0, so compute_linked_pod has PODS to choose from."""
    from statefuld_client import Client

    with Client(daemon_socket) as client:
        for pod in range(PODS):
            client.set_service_state(NS, SERVICE, pod, "Ready")
            client.report_pod_load(NS, SERVICE, pod, 0)
