"""How the executor reaches Redis: one server, a Redis Cluster, or the primary Sentinel names.

A ``Transport`` sends one command whose keys all share ``route_key``'s hash slot:
``execute(route_key, *args, decode=None, recover=None)`` (redis_mux says what the two callbacks
do). Every transport keeps ``redis_mux``'s batching: one multiplexed connection per node, a
turn's commands to that node in one write. What they add is knowing which node that is.

- ``StandaloneTransport``: one server (or whatever one URL names): every key lives there.
- ``ClusterTransport``: a slot table (16384 entries -> the primary's ``RedisMux``) read with
  ``CLUSTER SLOTS`` from any node. A command goes to its key's slot owner; ``MOVED`` updates that
  slot and retries there (and refreshes the whole table in the background), ``ASK`` sends
  ``ASKING`` plus the command to the importing node in one write. The table is refreshed on
  ``MOVED``, when a primary's connection is lost, and every ``CLUSTER_REFRESH_INTERVAL_S``.
- ``SentinelTransport``: asks the sentinels for the primary's address, checks with ``ROLE`` that
  it really is a primary, and sends everything there. A lost connection or a ``READONLY`` reply
  (the primary was demoted) makes it ask again at once; it also asks every
  ``SENTINEL_CHECK_INTERVAL_S``. While no primary answers, calls fail fast with ``Unavailable``.

Every node is reached with the seed URL's settings (TLS, user, password, client name); sentinels
have their own credentials (docs/OPERATIONS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from redis.crc import key_slot

from statefuld.config import Config
from statefuld.errors import Unavailable
from statefuld.redis_mux import Decode, Endpoint, Recover, RedisMux, ReplyError

log = logging.getLogger("statefuld.topology")

SLOTS = 16384
CLUSTER_REFRESH_INTERVAL_S = 5.0
SENTINEL_CHECK_INTERVAL_S = 1.0
# Error-triggered refreshes are at most this frequent: a failover makes every request fail at
# once, and one refresh in flight answers them all.
MIN_REFRESH_GAP_S = 0.1
NODE_QUERY_TIMEOUT_S = 1.0
MAX_REDIRECTS = 5

Address = tuple[str, int]


class Transport(Protocol):
    def execute(self, route_key: str, *args: Any, decode: Decode | None = None,
                recover: Recover | None = None) -> Awaitable[Any]: ...
    def execute_any(self, *args: Any) -> Awaitable[Any]: ...
    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]: ...
    async def on_every_node(self, *args: Any) -> list[Any]: ...
    def primaries(self) -> list[Callable[..., Awaitable[Any]]]: ...
    def primary_endpoints(self) -> list[Endpoint]: ...
    # Grows when which node serves which keys changed (a failover, a resharding): whatever
    # follows the nodes itself (the watch subscriptions) must assume it missed something.
    @property
    def topology_changes(self) -> int: ...
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    def describe(self) -> str: ...
    def stats(self) -> dict[str, int]: ...


def is_sentinel_url(url: str) -> bool:
    return url.startswith(("redis+sentinel://", "rediss+sentinel://"))


async def detect_cluster(endpoint: Endpoint) -> bool:
    """True when the node at ``endpoint`` runs with ``cluster-enabled yes``."""
    mux = RedisMux(endpoint)
    try:
        info = await asyncio.wait_for(mux.execute("INFO", "cluster"), NODE_QUERY_TIMEOUT_S)
    except ReplyError as exc:
        # A user without +info cannot tell us; such a node is taken as standalone (say
        # --redis-mode cluster to skip the question).
        log.warning("cannot detect the Redis mode (INFO cluster: %s); assuming standalone", exc)
        return False
    finally:
        await mux.close()
    return b"cluster_enabled:1" in bytes(info)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def url_host(host: str) -> str:
    """``host`` as it must appear in a URL or ``host:port``: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class _Background:
    """Tasks a transport runs on its own (refreshes, closing retired connections), kept
    referenced until they finish and cancelled on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("background Redis task failed: %s", exc)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class _Retired:
    """Connections a transport stopped using (a demoted or lost primary), closed in the background.
    Their commands and writes stay in the transport's totals: the Prometheus counters built on
    ``stats()`` must never go backwards when a failover retires a node."""

    def __init__(self, background: _Background) -> None:
        self._background = background
        self._closing: set[RedisMux] = set()
        self._commands = 0
        self._writes = 0

    def retire(self, mux: RedisMux) -> None:
        self._closing.add(mux)
        # A done-callback, not a finally in the task: a task cancelled before it ran (the
        # transport closing) never enters its coroutine, and the counts would be lost.
        self._background.start(mux.close()).add_done_callback(lambda _: self._closed(mux))

    def _closed(self, mux: RedisMux) -> None:
        if mux in self._closing:
            self._closing.discard(mux)
            stats = mux.stats()  # final now: nothing more is sent on a closed RedisMux
            self._commands += stats["commands"]
            self._writes += stats["writes"]

    def totals(self) -> tuple[int, int]:
        commands, writes = self._commands, self._writes
        for mux in self._closing:
            stats = mux.stats()
            commands += stats["commands"]
            writes += stats["writes"]
        return commands, writes


# --- one server ----------------------------------------------------------------------------------


class StandaloneTransport:
    """One Redis server (or whatever one URL names): every key lives on the one node."""

    topology_changes = 0  # one node, whatever happens to it

    def __init__(self, endpoint: Endpoint) -> None:
        self._mux = RedisMux(endpoint)

    def execute(self, route_key: str, *args: Any, decode: Decode | None = None,
                recover: Recover | None = None) -> Awaitable[Any]:
        return self._mux.execute(*args, decode=decode, recover=recover)

    def execute_any(self, *args: Any) -> Awaitable[Any]:
        return self._mux.execute(*args)

    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]:
        return [list(range(len(keys)))] if keys else []

    async def on_every_node(self, *args: Any) -> list[Any]:
        return [await self._mux.execute(*args)]

    def primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        """One ``execute(*args)`` per primary: what walks the whole keyspace (SCAN) uses."""
        return [self._mux.execute]

    def primary_endpoints(self) -> list[Endpoint]:
        """Where each primary is: what a subscription to every primary connects to."""
        return [self._mux.endpoint]

    async def connect(self) -> None:
        await self._mux.connect()

    async def close(self) -> None:
        await self._mux.close()

    def describe(self) -> str:
        return self._mux.endpoint.describe()

    def stats(self) -> dict[str, int]:
        return self._mux.stats()


# --- Redis Cluster -------------------------------------------------------------------------------


class ClusterTransport:
    """A Redis Cluster: one ``RedisMux`` per primary, commands routed by their key's slot."""

    def __init__(self, seed: Endpoint, *, refresh_interval_s: float = CLUSTER_REFRESH_INTERVAL_S) -> None:
        self._seed = seed
        self._refresh_interval_s = refresh_interval_s
        self._slots: list[RedisMux | None] = [None] * SLOTS
        # Each slot's owner as the slot table said last (MOVED does not change it): comparing the
        # next table with it tells which primary took over from which.
        self._owners: list[Address | None] = [None] * SLOTS
        self._primaries: dict[Address, RedisMux] = {}
        self._replicas: list[Address] = []
        self._source: RedisMux | None = None  # where the slot table was read last
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = -1e9
        self._background = _Background()
        self._retired = _Retired(self._background)
        self._periodic: asyncio.Task[None] | None = None
        self._closed = False
        self.refreshes = 0
        self.redirects = 0
        self.switches = 0
        self.topology_changes = 0

    # --- routing -----------------------------------------------------------------------------

    def execute(self, route_key: str, *args: Any, decode: Decode | None = None,
                recover: Recover | None = None) -> Awaitable[Any]:
        return self._execute(key_slot(route_key.encode()), args, decode, recover)

    async def _execute(self, slot: int, args: tuple[Any, ...], decode: Decode | None,
                       recover: Recover | None) -> Any:
        mux = self._slots[slot]
        for _ in range(MAX_REDIRECTS):
            if mux is None:
                self.request_refresh()
                raise Unavailable(f"no Redis Cluster primary serves slot {slot} now (failover?)")
            try:
                return await mux.execute(*args, decode=decode, recover=recover)
            except ReplyError as exc:
                if exc.kind == "MOVED":
                    # The slot has a new owner for good (failover, resharding): route it there now,
                    # and re-read the whole table, as other slots likely moved too.
                    self.redirects += 1
                    mux = self._slots[slot] = self._primary(self._redirect_address(exc))
                    self.request_refresh()
                    continue
                if exc.kind == "ASK":
                    # The slot is migrating and this key is already on the target: ask there once.
                    self.redirects += 1
                    return await self._asking(self._primary(self._redirect_address(exc)), args, decode)
                if isinstance(exc, Unavailable):  # CLUSTERDOWN, TRYAGAIN: the topology is changing
                    self.request_refresh()
                raise
            except Unavailable:
                self.request_refresh()
                raise
        raise Unavailable(f"Redis Cluster redirected slot {slot} more than {MAX_REDIRECTS} times")

    @staticmethod
    async def _asking(mux: RedisMux, args: tuple[Any, ...], decode: Decode | None) -> Any:
        await mux.connect()
        # Both in this turn's write, ASKING first: it applies to the very next command only.
        replies: tuple[Any, Any] = await asyncio.gather(
            mux.execute("ASKING"), mux.execute(*args, decode=decode), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies[1]

    def _redirect_address(self, exc: ReplyError) -> Address:
        # "MOVED 3999 127.0.0.1:6381"; an empty host means the node we asked.
        target = exc.reply.split(" ")[2]
        host, _, port = target.rpartition(":")
        return host or self._seed.host, int(port)

    def _primary(self, address: Address) -> RedisMux:
        mux = self._primaries.get(address)
        if mux is None:
            mux = self._primaries[address] = RedisMux(self._node(address))
        return mux

    def _node(self, address: Address) -> Endpoint:
        return dataclasses.replace(self._seed, path=None, host=address[0], port=address[1])

    def execute_any(self, *args: Any) -> Awaitable[Any]:
        # Health: ready only when every primary answers, i.e. every slot can be served.
        return self._on_every_primary_first(args)

    async def _on_every_primary_first(self, args: tuple[Any, ...]) -> Any:
        return (await self.on_every_node(*args))[0]

    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]:
        # One group per slot (a multi-key command must stay in one slot). The groups are sent in
        # the same turn, so each node still gets all of its groups in one write: one round trip.
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(index)
        return list(groups.values())

    async def on_every_node(self, *args: Any) -> list[Any]:
        primaries = self._current_primaries()
        if not primaries:
            self.request_refresh()
            raise Unavailable("no Redis Cluster primary is known")
        try:
            return list(await asyncio.gather(*(mux.execute(*args) for mux in primaries)))
        except Unavailable:
            self.request_refresh()
            raise

    def primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        primaries = self._current_primaries()
        if not primaries:
            self.request_refresh()
            raise Unavailable("no Redis Cluster primary is known")
        return [mux.execute for mux in primaries]

    def primary_endpoints(self) -> list[Endpoint]:
        return [mux.endpoint for mux in self._current_primaries()]

    def _current_primaries(self) -> list[RedisMux]:
        return list({id(mux): mux for mux in self._slots if mux is not None}.values())

    # --- topology ------------------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Re-read the slot table soon (in the background), unless a refresh just ran."""
        if self._closed or self._refreshing is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_refresh < MIN_REFRESH_GAP_S:
            return
        self._refreshing = self._background.start(self._refresh())

    async def refresh(self) -> None:
        """Re-read the slot table now; raises ``Unavailable`` if no node answers."""
        task = self._refreshing
        if task is None:
            task = self._refreshing = self._background.start(self._refresh())
        await asyncio.shield(task)

    async def _refresh(self) -> None:
        try:
            self._last_refresh = asyncio.get_running_loop().time()
            reply, source = await self._read_slots()
            self._apply(reply, source)
            self.refreshes += 1
        finally:
            self._refreshing = None

    async def _read_slots(self) -> tuple[Any, Address]:
        # One node at a time, a bounded wait each: the node that answered last (one connection
        # kept for this), then the replicas, the seed and the primaries. Replicas first keeps
        # the periodic refresh off the primaries' command stream.
        seed = (self._seed.host, self._seed.port)
        candidates: list[Address] = []
        if self._source is not None:
            candidates.append((self._source.endpoint.host, self._source.endpoint.port))
        for address in [*self._replicas, seed, *self._primaries]:
            if address not in candidates:
                candidates.append(address)
        errors: list[str] = []
        for address in candidates:
            mux = self._source if self._source is not None and candidates[0] == address else None
            if mux is None:
                mux = self._primaries.get(address) or RedisMux(self._seed if address == seed else self._node(address))
            try:
                reply = await asyncio.wait_for(mux.execute("CLUSTER", "SLOTS"), NODE_QUERY_TIMEOUT_S)
            except ReplyError as exc:
                await self._forget_source(mux)
                if "cluster support disabled" in exc.reply:
                    raise ValueError(f"{self._seed.describe()} is not a Redis Cluster node: {exc.reply}") from exc
                errors.append(f"{address[0]}:{address[1]}: {exc.reply}")
                continue
            except (Unavailable, TimeoutError) as exc:
                await self._forget_source(mux)
                errors.append(f"{address[0]}:{address[1]}: {exc or 'no answer'}")
                continue
            if mux is not self._source:
                await self._forget_source(self._source)
                self._source = mux
            return reply, address
        raise Unavailable(f"no Redis Cluster node answered CLUSTER SLOTS: {'; '.join(errors)[:300]}")

    async def _forget_source(self, mux: RedisMux | None) -> None:
        if mux is self._source:
            self._source = None
        if mux is not None and mux not in self._primaries.values():
            await mux.close()

    def _apply(self, reply: Any, source: Address) -> None:
        def address(node: Any) -> Address:
            host = _text(node[0])
            return (host if host and host != "?" else source[0]), int(node[1])

        slots: list[RedisMux | None] = [None] * SLOTS
        replicas: list[Address] = []
        owners = self._owners
        # (previous owner, new owner) of slots that changed hands: a failover or a resharding. A
        # slot no entry covers keeps its last owner, so a gap in the table is not a switch.
        switches: set[tuple[Address, Address]] = set()
        for entry in reply:
            start, end, owner, *others = entry
            first, stop = int(start), int(end) + 1
            owner_address = address(owner)
            switches.update((old, owner_address) for old in set(owners[first:stop]) - {None, owner_address}
                            if old is not None)
            owners[first:stop] = [owner_address] * (stop - first)
            slots[first:stop] = [self._primary(owner_address)] * (stop - first)
            replicas.extend(address(node) for node in others)
        changed = any(new is not old for new, old in zip(slots, self._slots, strict=True))
        first_table = all(mux is None for mux in self._slots)
        self._slots = slots
        self._replicas = replicas
        serving = {id(mux) for mux in slots if mux is not None}
        for addr, mux in list(self._primaries.items()):
            if id(mux) not in serving:
                # Demoted or gone: what is still in flight there fails (or was MOVED already).
                del self._primaries[addr]
                if mux is self._source:
                    self._source = None
                self._retired.retire(mux)
        for old, new in sorted(switches):
            # Counted like a Sentinel switch: RedisWatch logs the redis_failover event for it.
            self.switches += 1
            log.warning("Redis Cluster primary %s:%d replaced: its slots are served by %s:%d now",
                        url_host(old[0]), old[1], url_host(new[0]), new[1])
        if changed:
            if not first_table:
                self.topology_changes += 1
            log.info("Redis Cluster topology: %s", self.describe())

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.refresh()
        await asyncio.gather(*(mux.connect() for mux in self._current_primaries()))
        if self._periodic is None:
            self._periodic = self._background.start(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            try:
                await self.refresh()
            except (Unavailable, ValueError) as exc:
                log.warning("Redis Cluster topology refresh failed: %s", exc)

    async def close(self) -> None:
        self._closed = True
        await self._background.cancel_all()
        await self._forget_source(self._source)
        await asyncio.gather(*(mux.close() for mux in self._primaries.values()))

    def describe(self) -> str:
        primaries = sorted(f"{url_host(mux.endpoint.host)}:{mux.endpoint.port}" for mux in self._current_primaries())
        return f"Redis Cluster via {self._seed.describe()} (primaries: {', '.join(primaries) or 'none yet'})"

    def stats(self) -> dict[str, int]:
        commands, writes = self._retired.totals()
        for mux in self._primaries.values():
            stats = mux.stats()
            commands += stats["commands"]
            writes += stats["writes"]
        return {"commands": commands, "writes": writes, "redirects": self.redirects, "refreshes": self.refreshes,
                "switches": self.switches}


# --- Sentinel --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/db]``."""

    sentinels: list[Address]
    master_name: str
    tls: bool
    db: int
    username: str | None
    password: str | None = dataclasses.field(repr=False)

    def node_url(self, address: Address) -> str:
        """A ``redis://`` (``rediss://``) URL of the node at ``address``, with this URL's db."""
        return f"{'rediss' if self.tls else 'redis'}://{url_host(address[0])}:{address[1]}/{self.db}"

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        sentinels: list[Address] = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"sentinel address {item!r} is not host:port")
            sentinels.append((host.strip("[]"), int(port)))
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path or len(path) > 2:
            raise ValueError("a redis+sentinel:// URL ends with /MASTER_NAME (optionally /DB)")
        if len(path) == 2 and not path[1].isdigit():
            raise ValueError(f"database {path[1]!r} is not a number")
        username, _, password = userinfo.partition(":")
        return cls(
            sentinels=sentinels,
            master_name=path[0],
            tls=parts.scheme == "rediss+sentinel",
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
        )


class SentinelTransport:
    """The primary that the sentinels name, followed through failovers."""

    def __init__(self, sentinels: Sequence[Endpoint], master_name: str, primary_template: Endpoint, *,
                 check_interval_s: float = SENTINEL_CHECK_INTERVAL_S) -> None:
        if not sentinels:
            raise ValueError("at least one sentinel is needed")
        self._sentinels = [RedisMux(endpoint) for endpoint in sentinels]
        self._master_name = master_name
        self._template = primary_template
        self._check_interval_s = check_interval_s
        self._mux: RedisMux | None = None
        self._resolving: asyncio.Task[RedisMux] | None = None
        self._last_resolve = -1e9
        self._background = _Background()
        self._retired = _Retired(self._background)
        self._periodic: asyncio.Task[None] | None = None
        self._closed = False
        self._found_one = False
        self.switches = 0

    # --- routing -----------------------------------------------------------------------------

    def execute(self, route_key: str, *args: Any, decode: Decode | None = None,
                recover: Recover | None = None) -> Awaitable[Any]:
        mux = self._mux
        if mux is None:
            return self._execute_after_resolve(args, decode, recover)
        reply = mux.execute(*args, decode=decode, recover=recover)
        reply.add_done_callback(self._check_reply)  # no coroutine per call while connected
        return reply

    def execute_any(self, *args: Any) -> Awaitable[Any]:
        return self.execute("", *args)

    def _check_reply(self, reply: asyncio.Future[Any]) -> None:
        if reply.cancelled():
            return
        exc = reply.exception()
        if isinstance(exc, Unavailable) or (isinstance(exc, ReplyError) and exc.kind == "READONLY"):
            self.request_resolve()

    async def _execute_after_resolve(self, args: tuple[Any, ...], decode: Decode | None,
                                     recover: Recover | None) -> Any:
        mux = await self._resolve_now()
        reply = mux.execute(*args, decode=decode, recover=recover)
        reply.add_done_callback(self._check_reply)
        return await reply

    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]:
        return [list(range(len(keys)))] if keys else []

    async def on_every_node(self, *args: Any) -> list[Any]:
        return [await self.execute_any(*args)]

    def primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        return [self.execute_any]

    def primary_endpoints(self) -> list[Endpoint]:
        if self._mux is None:
            self.request_resolve()
            return []
        return [self._mux.endpoint]

    @property
    def topology_changes(self) -> int:
        return self.switches

    # --- finding the primary ---------------------------------------------------------------------

    def request_resolve(self) -> None:
        if self._closed or self._resolving is not None:
            return
        if asyncio.get_running_loop().time() - self._last_resolve < MIN_REFRESH_GAP_S:
            return
        self._resolving = self._background.start(self._resolve(verify=True))

    async def _resolve_now(self, *, verify: bool = True) -> RedisMux:
        task = self._resolving
        if task is None:
            task = self._resolving = self._background.start(self._resolve(verify=verify))
        return await asyncio.shield(task)

    async def _resolve(self, *, verify: bool) -> RedisMux:
        try:
            self._last_resolve = asyncio.get_running_loop().time()
            return await self._find_primary(verify)
        finally:
            self._resolving = None

    async def _find_primary(self, verify: bool) -> RedisMux:
        errors: list[str] = []
        for index, sentinel in enumerate(list(self._sentinels)):
            try:
                reply = await asyncio.wait_for(
                    sentinel.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._master_name), NODE_QUERY_TIMEOUT_S
                )
            except (Unavailable, TimeoutError, ReplyError) as exc:
                errors.append(f"sentinel {sentinel.endpoint.describe()}: {exc or 'no answer'}")
                continue
            if reply is None:
                errors.append(f"sentinel {sentinel.endpoint.describe()} does not know {self._master_name!r}")
                continue
            address = (_text(reply[0]), int(reply[1]))
            mux = await self._verified_primary(address, errors, verify)
            if mux is not None:
                if index:  # ask the sentinel that knew first next time (as redis-py does)
                    self._sentinels.insert(0, self._sentinels.pop(index))
                return mux
        self._drop_primary()
        raise Unavailable(f"no Redis primary for {self._master_name!r} now: {'; '.join(errors)[:400]}")

    async def _verified_primary(self, address: Address, errors: list[str], verify: bool) -> RedisMux | None:
        current = self._mux
        is_current = current is not None and (current.endpoint.host, current.endpoint.port) == address
        if is_current and current is not None and current.connected and not verify:
            return current  # the periodic check: nothing changed, the primary's stream is left alone
        mux = current if is_current and current is not None else RedisMux(
            dataclasses.replace(self._template, host=address[0], port=address[1])
        )
        try:
            role = await asyncio.wait_for(mux.execute("ROLE"), NODE_QUERY_TIMEOUT_S)
        except (Unavailable, TimeoutError, ReplyError) as exc:
            role = None
            errors.append(f"{address[0]}:{address[1]}: {exc or 'no answer'}")
        if role is not None and _text(role[0]) == "master":
            if not is_current:
                self._switch_to(mux, address)
            return mux
        if role is not None:
            errors.append(f"{address[0]}:{address[1]} is a {_text(role[0])}, not a primary")
        if not is_current:
            self._background.start(mux.close())
        return None

    def _switch_to(self, mux: RedisMux, address: Address) -> None:
        first = self._mux is None and not self._found_one
        self._found_one = True
        self._drop_primary()
        self._mux = mux
        # The first primary found at start is no failover: not counted as a switch, and said at
        # info, not as a warning.
        if not first:
            self.switches += 1
        log.log(logging.INFO if first else logging.WARNING, "Redis primary %r is %s %s:%d",
                self._master_name, "at" if first else "now", url_host(address[0]), address[1])

    def _drop_primary(self) -> None:
        # Calls fail fast (and ask again) until a verified primary is found.
        if self._mux is not None:
            self._retired.retire(self._mux)
            self._mux = None

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            with contextlib.suppress(Unavailable):
                await self._resolve_now(verify=False)

    # --- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        mux = await self._resolve_now()
        await mux.connect()
        if self._periodic is None:
            self._periodic = self._background.start(self._check_periodically())

    async def close(self) -> None:
        self._closed = True
        await self._background.cancel_all()
        muxes = [*self._sentinels, *([self._mux] if self._mux is not None else [])]
        await asyncio.gather(*(mux.close() for mux in muxes))

    def describe(self) -> str:
        sentinels = ",".join(f"{url_host(m.endpoint.host)}:{m.endpoint.port}" for m in self._sentinels)
        primary = "none now" if self._mux is None else f"{url_host(self._mux.endpoint.host)}:{self._mux.endpoint.port}"
        return f"Redis Sentinel {sentinels} master {self._master_name!r} (primary: {primary})"

    def stats(self) -> dict[str, int]:
        commands, writes = self._retired.totals()
        if self._mux is not None:
            stats = self._mux.stats()
            commands += stats["commands"]
            writes += stats["writes"]
        return {"commands": commands, "writes": writes, "switches": self.switches}


# --- choosing one ----------------------------------------------------------------------------------


def _redis_kwargs(config: Config, tls: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.redis_username:
        kwargs["username"] = config.redis_username
    if config.redis_password:
        kwargs["password"] = config.redis_password
    if tls:
        kwargs["ssl_ca_certs"] = config.redis_tls_ca_file
        kwargs["ssl_certfile"] = config.redis_tls_cert_file
        kwargs["ssl_keyfile"] = config.redis_tls_key_file
    return kwargs


def _endpoint(url: str, config: Config, tls: bool) -> Endpoint:
    """``url`` as redis-py parses it, with the daemon's credentials, TLS files and busy polling."""
    endpoint = Endpoint.from_url(url, **_redis_kwargs(config, tls))
    return dataclasses.replace(endpoint, busy_poll_s=config.busy_poll_us / 1_000_000)


def _sentinel_transport(url: str, config: Config) -> SentinelTransport:
    parsed = SentinelUrl.parse(url)
    # The primary: --redis-username and STATEFULD_REDIS_PASSWORD, as for any Redis. The
    # sentinels: the credentials in the URL (sentinels often have their own password, or none).
    primary = _endpoint(parsed.node_url(parsed.sentinels[0]), config, parsed.tls)
    sentinel = dataclasses.replace(
        primary, db=0, username=parsed.username, password=parsed.password, credential_provider=None
    )
    return SentinelTransport(
        [dataclasses.replace(sentinel, host=h, port=p) for h, p in parsed.sentinels], parsed.master_name, primary
    )


def make_transport(config: Config, mode: str | None = None) -> Transport:
    """The transport for ``mode`` (default ``config.redis_mode``). Without I/O, "auto" can only
    tell a sentinel URL; ``detect_mode`` asks Redis whether a plain URL names a cluster node."""
    url = config.redis_url
    if url is None:
        raise ValueError("no Redis URL (the embedded Redis provides one)")
    mode = mode or config.redis_mode
    if is_sentinel_url(url):
        if mode not in ("auto", "sentinel"):
            raise ValueError(f"a redis+sentinel:// URL cannot be used with redis_mode {mode!r}")
        return _sentinel_transport(url, config)
    if mode == "sentinel":
        raise ValueError("redis_mode sentinel needs a redis+sentinel://host:port[,host:port...]/MASTER_NAME URL")
    endpoint = _endpoint(url, config, url.startswith("rediss://"))
    if mode == "cluster":
        return ClusterTransport(endpoint)
    return StandaloneTransport(endpoint)


async def detect_mode(config: Config) -> str:
    """``config.redis_mode``, with "auto" resolved: sentinel by URL, cluster if the node says so."""
    url = config.redis_url
    if config.redis_mode != "auto" or url is None:
        return config.redis_mode
    if is_sentinel_url(url):
        return "sentinel"
    endpoint = _endpoint(url, config, url.startswith("rediss://"))
    return "cluster" if await detect_cluster(endpoint) else "standalone"
