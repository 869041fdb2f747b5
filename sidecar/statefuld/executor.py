"""Every operation of the contract as Redis work. The only module that knows Redis commands
and key formats (docs/OPERATIONS.md has the layout, shared with the Go and Java executors).

Commands reach Redis through a ``Transport``: ``execute(route_key, *args)`` sends one command
whose keys all share ``route_key``'s hash slot. The standalone transport is one multiplexed
connection (redis_mux: a turn's commands in one write); a cluster transport routes by slot to
one such connection per primary. Callers of the executor never see which.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

from statefuld.config import Config
from statefuld.errors import Internal, Unavailable
from statefuld.redis_mux import CRLF, Endpoint, RedisMux, ReplyError, Waiter, bulk_head, command_head, encode_get
from statefuld.scripts import Scripts, load_scripts
from statefuld.topology import ClusterTransport, SentinelTransport, SentinelUrl, detect_cluster, is_sentinel_url

log = logging.getLogger("statefuld.executor")

HEALTH_TIMEOUT_S = 1.0
# Error replies that mean "this Redis cannot serve now", not "this request is wrong".
_UNAVAILABLE_REPLIES = frozenset({"LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS"})


class Transport(Protocol):
    def execute(self, route_key: str, *args: Any) -> Awaitable[Any]: ...
    def execute_any(self, *args: Any) -> Awaitable[Any]: ...
    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]: ...
    async def on_every_node(self, *args: Any) -> list[Any]: ...
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    def describe(self) -> str: ...


class StandaloneTransport:
    """One Redis server (or whatever one URL names): every key lives on the one node."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._mux = RedisMux(endpoint)
        # One node, nothing to route: the mux's own execute_to(waiter, args) is this transport's.
        self.execute_to = self._mux.execute_to

    def execute(self, route_key: str, *args: Any) -> Awaitable[Any]:
        return self._mux.execute(*args)

    def execute_any(self, *args: Any) -> Awaitable[Any]:
        return self._mux.execute(*args)

    def group_by_node(self, keys: Sequence[str]) -> list[list[int]]:
        return [list(range(len(keys)))] if keys else []

    async def on_every_node(self, *args: Any) -> list[Any]:
        return [await self._mux.execute(*args)]

    async def connect(self) -> None:
        await self._mux.connect()

    async def close(self) -> None:
        await self._mux.close()

    def describe(self) -> str:
        return self._mux.endpoint.describe()

    def stats(self) -> dict[str, int]:
        return self._mux.stats()


class Keys:
    """The key layout (section 1 of the contract). Arguments are validated before they get here:
    ns and service hold no ':' '{' '}', uid no '{' '}', so distinct tuples give distinct keys."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def service_state(self, ns: str, service: str) -> str:
        return f"{self.prefix}:{{{ns}:state:{service}}}"

    def pod_load(self, ns: str, service: str) -> str:
        return f"{self.prefix}:{{{ns}:state:{service}}}load"

    def workload_state(self, ns: str, service: str) -> str:
        return f"{self.prefix}:{{{ns}:workload:{service}}}"

    def link_hash(self, ns: str, uid: str) -> str:
        return f"{self.prefix}:{{{ns}:lk:{uid}}}"

    def link(self, ns: str, uid: str, service: str) -> str:
        return f"{self.prefix}:{{{ns}:lk:{uid}}}{service}"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


MAX_POD_ID = 2**31 - 1


# The ids pods have in practice (StatefulSet ordinals, small indices) as Redis returns them: a
# get_linked_pod's reply is decoded with one dict lookup instead of isdigit() and int().
_SMALL_POD_IDS: Final[dict[bytes, int]] = {b"%d" % pod: pod for pod in range(1024)}


def _parse_pod_id(raw: bytes) -> int | None:
    """The pod id a stored value holds, or None if it holds something else."""
    pod = _SMALL_POD_IDS.get(raw)
    # bytes.isdigit() is ASCII digits only. Larger ids are another tool's data, not pods (and
    # msgpack cannot carry every such integer in a reply).
    if pod is None and raw.isdigit():
        pod = int(raw)
        if pod > MAX_POD_ID:
            return None
    return pod


def _is_pod_id(raw: bytes) -> bool:
    return _parse_pod_id(raw) is not None


def _pod_id(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    pod = _parse_pod_id(raw)
    if pod is None:
        raise Internal(f"a stored pod id is not a decimal integer in 0..{MAX_POD_ID}")
    return pod


def _held_pod_id(raw: bytes) -> int:
    """The link that made a script refuse (it wrote nothing). A value that is not a pod id
    (another tool's data) still holds the user, but cannot be answered as one."""
    pod = _parse_pod_id(raw)
    if pod is not None:
        return pod
    raise Internal(
        f"the user's link holds a value that is not a decimal pod id in 0..{MAX_POD_ID} "
        "(another tool's data?); the link was not changed"
    )


def _map_reply_error(exc: ReplyError) -> Exception:
    if exc.code in _UNAVAILABLE_REPLIES:
        return Unavailable(f"Redis cannot serve now: {exc.message[:200]}")
    return Internal(f"Redis error: {exc.message[:200]}")


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


class Executor:
    def __init__(
        self,
        transport: Transport,
        scripts: Scripts,
        keys: Keys,
        *,
        routable_states: Sequence[str] = ("Ready",),
        load_stale_ms: int = 10_000,
    ) -> None:
        self._redis = transport
        # A transport with one node can hand a reply to a redis_mux.Waiter (no future): it has
        # execute_to(waiter, command), RedisMux.execute_to, which takes the command in RESP.
        self._execute_to: Callable[[Waiter, bytes], bool] | None = getattr(transport, "execute_to", None)
        self._set_linked_pod_sha = scripts["set_linked_pod"].sha
        # EVALSHA sha 2 hash_key key service pod_id persist_seconds: the first three words, encoded once.
        self._set_linked_pod_head = command_head(8, "EVALSHA", self._set_linked_pod_sha, 2)
        self._scripts = scripts
        self.keys = keys
        self._routable_states = tuple(routable_states)
        self._load_stale_ms = load_stale_ms
        self._warned_unreadable_previous = False
        # Bound once: the hot path hands it out with every set_linked_pod.
        self._decode_previous: Callable[[Any], int | None] = self._previous_pod_id

    @classmethod
    async def connect(cls, config: Config) -> Executor:
        """Connect (retrying until ``startup_timeout_s``), then load every script.

        Raises ``Unavailable`` when Redis cannot be reached in time, ``ValueError`` for a
        configuration Redis cannot be used with.
        """
        make_transport(config)  # a configuration error is raised now, not after the retries
        scripts, keys = Scripts(load_scripts()), Keys(config.key_prefix)
        transport: Transport | None = None
        deadline = time.monotonic() + config.startup_timeout_s
        delay_s = 0.05
        while True:
            try:
                if transport is None:  # "auto" is decided once Redis answers
                    transport = make_transport(config, await detect_mode(config))
                executor = cls(
                    transport, scripts, keys, routable_states=config.routable_state, load_stale_ms=config.load_stale_ms
                )
                await transport.connect()
                await asyncio.wait_for(transport.execute_any("PING"), HEALTH_TIMEOUT_S)
                await executor.load_scripts()
                return executor
            except ValueError:
                if transport is not None:
                    await transport.close()
                raise
            except (Unavailable, TimeoutError, ReplyError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if transport is not None:
                        await transport.close()
                    if isinstance(exc, ReplyError):
                        raise _map_reply_error(exc) from exc
                    raise Unavailable(str(exc) or "Redis did not answer in time") from exc
                where = transport.describe() if transport is not None else "the configured URL"
                log.warning("Redis at %s not ready yet: %s", where, exc)
                await asyncio.sleep(min(delay_s, remaining))
                delay_s = min(delay_s * 2, 1.0)

    async def load_scripts(self) -> None:
        for script in self._scripts.all():
            for sha in await self._redis.on_every_node("SCRIPT", "LOAD", script.source):
                if _text(sha) != script.sha:
                    raise Internal(f"Redis computed another SHA for {script.name}")

    async def close(self) -> None:
        await self._redis.close()

    @property
    def script_reloads(self) -> int:
        return self._scripts.reloads

    def transport_stats(self) -> dict[str, int]:
        """The transport's counters for the metrics: commands, writes (and switches, Sentinel)."""
        stats: Callable[[], dict[str, int]] | None = getattr(self._redis, "stats", None)
        return stats() if stats is not None else {}

    def describe_transport(self) -> str:
        return self._redis.describe()

    async def health(self) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self._redis.execute_any("PING"), HEALTH_TIMEOUT_S)
        except TimeoutError:
            return {"ready": False, "redis": f"unreachable: no answer within {HEALTH_TIMEOUT_S}s"}
        except (Unavailable, ReplyError) as exc:
            return {"ready": False, "redis": f"unreachable: {exc}"}
        return {"ready": True, "redis": "ok"}

    # --- plumbing ----------------------------------------------------------------------------

    async def _call(self, route_key: str, *args: Any) -> Any:
        try:
            return await self._redis.execute(route_key, *args)
        except ReplyError as exc:
            raise _map_reply_error(exc) from exc

    async def _script(self, name: str, keys: Sequence[str], *args: Any) -> Any:
        try:
            return await self._scripts.run(self._redis, name, keys, args)
        except ReplyError as exc:
            raise _map_reply_error(exc) from exc

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET across nodes: one command per node (its keys), never one per key."""
        values: list[bytes | None] = [None] * len(keys)
        groups = self._redis.group_by_node(keys)
        replies = await asyncio.gather(*[self._call(keys[g[0]], "MGET", *[keys[i] for i in g]) for g in groups])
        for group, reply in zip(groups, replies, strict=True):
            for index, value in zip(group, reply, strict=True):
                values[index] = value
        return values

    # --- pod and workload states -------------------------------------------------------------

    async def set_service_state(self, ns: str, service: str, pod_id: int, state: str) -> None:
        key = self.keys.service_state(ns, service)
        await self._call(key, "HSET", key, pod_id, state)

    async def get_service_state(self, ns: str, service: str) -> dict[int, str]:
        key = self.keys.service_state(ns, service)
        flat = await self._call(key, "HGETALL", key)
        # Fields that are not decimal pod ids (another tool's data) are not pods: skip them.
        return {
            int(flat[i]): _text(flat[i + 1])
            for i in range(0, len(flat), 2)
            if _is_pod_id(flat[i])
        }

    async def set_workload_state(self, ns: str, service: str, state: str) -> None:
        key = self.keys.workload_state(ns, service)
        await self._call(key, "SET", key, state)

    async def get_workload_state(self, ns: str, service: str) -> str | None:
        key = self.keys.workload_state(ns, service)
        raw = await self._call(key, "GET", key)
        return None if raw is None else _text(raw)

    async def get_workload_state_batch(self, ns: str, services: list[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(services))
        values = await self._mget([self.keys.workload_state(ns, s) for s in unique])
        return {s: _text(v) for s, v in zip(unique, values, strict=True) if v is not None}

    # --- links -------------------------------------------------------------------------------

    def _link_keys(self, ns: str, uid: str, service: str) -> tuple[str, str]:
        return self.keys.link_hash(ns, uid), self.keys.link(ns, uid, service)

    def _previous_pod_id(self, raw: bytes | None) -> int | None:
        # By the time set_linked_pod's reply is decoded, the script has overwritten the link: an
        # error here would tell the caller that a completed write failed. A previous value that
        # is not a pod id (another tool's data) is answered as nil; the value itself is not
        # logged (it may be user data), and only once, so a migration cannot flood the log.
        if raw is None:
            return None
        pod = _parse_pod_id(raw)
        if pod is not None:
            return pod
        if not self._warned_unreadable_previous:
            self._warned_unreadable_previous = True
            log.warning(
                "set_linked_pod overwrote a link whose value was not a pod id in 0..%d (another tool's "
                "data?) and answered nil as the previous pod; further such links are not logged",
                MAX_POD_ID,
            )
        return None

    async def set_linked_pod(self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int) -> int | None:
        previous = await self._script(
            "set_linked_pod", self._link_keys(ns, uid, service), service, pod_id, persist_seconds
        )
        return self._previous_pod_id(previous)

    async def try_set_linked_pod(
        self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int
    ) -> tuple[bool, int]:
        ok, current = await self._script(
            "try_set_linked_pod", self._link_keys(ns, uid, service), service, pod_id, persist_seconds
        )
        if ok:
            return True, pod_id  # the script echoes pod_id back: nothing stored to decode
        return False, _held_pod_id(current)

    async def set_linked_pod_if_absent(
        self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int
    ) -> int:
        current = await self._script(
            "set_linked_pod_if_absent", self._link_keys(ns, uid, service), service, pod_id, persist_seconds
        )
        return _held_pod_id(current)

    async def get_linked_pod(self, ns: str, uid: str, service: str) -> int | None:
        key = self.keys.link(ns, uid, service)
        return _pod_id(await self._call(key, "GET", key))

    # --- the hot path: the command sent, no coroutine --------------------------------------------
    # The raw reply goes to ``waiter`` (then the awaitable returned is None) or, on transports
    # without execute_to, to the future returned; the second item decodes it. The server answers
    # from there (rpc.Dispatcher.hot / start); an error reply reaches it as a ReplyError and goes
    # through reply_error (NOSCRIPT: the full path, which reloads the script).

    def begin_get_linked_pod(
        self, ns: str, uid: str, service: str, waiter: Waiter | None = None
    ) -> tuple[Awaitable[Any] | None, Callable[[Any], Any]]:
        key = self.keys.link(ns, uid, service)
        if waiter is not None and self._execute_to is not None and self._execute_to(waiter, encode_get(key)):
            return None, _pod_id
        return self._redis.execute(key, "GET", key), _pod_id

    def begin_set_linked_pod(
        self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int, waiter: Waiter | None = None
    ) -> tuple[Awaitable[Any] | None, Callable[[Any], Any]]:
        hash_key, key = self._link_keys(ns, uid, service)
        if waiter is not None and self._execute_to is not None:
            # The head (EVALSHA sha 2) is encoded once; the five words after it, one bulk each,
            # in one join (redis_mux, "RESP for the hot path").
            h, k, s, p, t = hash_key.encode(), key.encode(), service.encode(), b"%d" % pod_id, b"%d" % persist_seconds
            command = b"".join((self._set_linked_pod_head, bulk_head(len(h)), h, CRLF, bulk_head(len(k)), k, CRLF,
                                bulk_head(len(s)), s, CRLF, bulk_head(len(p)), p, CRLF, bulk_head(len(t)), t, CRLF))
            if self._execute_to(waiter, command):
                return None, self._decode_previous
        return self._redis.execute(hash_key, "EVALSHA", self._set_linked_pod_sha, 2, hash_key, key, service, pod_id,
                                   persist_seconds), self._decode_previous

    @staticmethod
    def reply_error(exc: ReplyError) -> Exception:
        """The RpcError that answers a Redis error reply."""
        return _map_reply_error(exc)

    async def get_linked_pod_if_persist(self, ns: str, uid: str, service: str) -> int | None:
        return _pod_id(await self._script("get_linked_pod_if_persist", self._link_keys(ns, uid, service)))

    async def batch_get_linked_pod(self, ns: str, uids: list[str], service: str) -> dict[int, list[str]]:
        unique = list(dict.fromkeys(uids))
        values = await self._mget([self.keys.link(ns, uid, service) for uid in unique])
        by_pod: dict[int, list[str]] = {}
        for uid, raw in zip(unique, values, strict=True):
            pod = _pod_id(raw)
            if pod is not None:
                by_pod.setdefault(pod, []).append(uid)
        return by_pod

    async def remove_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int) -> bool:
        existed = await self._script(
            "remove_linked_pod", self._link_keys(ns, uid, service), service, persist_seconds
        )
        return bool(existed)

    async def remove_linked_pod_with_id(
        self, ns: str, uid: str, service: str, persist_seconds: int, pod_id: int
    ) -> bool:
        removed = await self._script(
            "remove_linked_pod_with_id", self._link_keys(ns, uid, service), service, persist_seconds, pod_id
        )
        return bool(removed)

    async def get_link_service(self, ns: str, uid: str) -> dict[str, int]:
        key = self.keys.link_hash(ns, uid)
        flat = await self._call(key, "HGETALL", key)
        links: dict[str, int] = {}
        for i in range(0, len(flat), 2):
            if _is_pod_id(flat[i + 1]):
                links[_text(flat[i])] = int(flat[i + 1])
        return links

    # --- placement (contract section 2b) -----------------------------------------------------

    async def report_pod_load(self, ns: str, service: str, pod_id: int, load: int) -> None:
        key = self.keys.pod_load(ns, service)
        await self._script("report_pod_load", (key,), pod_id, load)

    async def compute_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int) -> int | None:
        existing = await self.get_linked_pod(ns, uid, service)
        if existing is not None:
            return existing  # whatever the pods' states; nothing changes, no TTL reset
        state_key = self.keys.service_state(ns, service)
        picked = await self._script(
            "pick_pod",
            (state_key, self.keys.pod_load(ns, service)),
            self._load_stale_ms,
            random.random(),
            random.random(),
            *self._routable_states,
        )
        if picked is None:
            return None
        # A second script on the user's slot: if another caller linked the user meanwhile, that
        # link wins (set-if-absent), so no user ever has two links.
        return await self.set_linked_pod_if_absent(ns, uid, service, int(picked), persist_seconds)
