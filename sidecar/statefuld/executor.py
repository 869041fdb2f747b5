"""Every operation of the contract as Redis work. The only module that knows Redis commands and
key formats (docs/OPERATIONS.md has the layout, shared with the older in-process executors).

A method that is one command returns the transport's future, its reply decoded inside the read
that brought it (no coroutine); a method of several steps is a coroutine. rpc.Dispatcher hands
either to calls.py, which awaits both alike.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from statefuld.config import PASSWORD_ENV, Config
from statefuld.errors import Internal, Unavailable
from statefuld.redis_mux import ReplyError, Then
from statefuld.scripts import Scripts, load_scripts
from statefuld.transports import Transport, detect_mode, make_transport

log = logging.getLogger("statefuld.executor")

HEALTH_TIMEOUT_S = 1.0
MAX_POD_ID = 2**31 - 1
ROUTE_OUTCOMES = ("kept", "placed", "moved", "none")
# Pods route_user found alive, remembered for --alive-cache-ms; bounded: cleared when full.
_ALIVE_CACHED = 4096


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


# --- what stored values mean ---------------------------------------------------------------------


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def parse_pod_id(raw: bytes) -> int | None:
    """The pod id a stored value holds (ASCII decimal digits, 0..2^31-1), or None if it holds
    something else: another tool's data, not a pod."""
    # bytes.isdigit() is ASCII digits only.
    if not raw.isdigit():
        return None
    pod = int(raw)
    return pod if pod <= MAX_POD_ID else None


def _pod_id(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    pod = parse_pod_id(raw)
    if pod is None:
        raise Internal(f"a stored pod id is not a decimal integer in 0..{MAX_POD_ID}")
    return pod


def _held_pod_id(raw: bytes) -> int:
    """The link that made a script refuse (it wrote nothing). A value that is not a pod id
    (another tool's data) still holds the user, but cannot be answered as one."""
    pod = parse_pod_id(raw)
    if pod is not None:
        return pod
    raise Internal(
        f"the user's link holds a value that is not a decimal pod id in 0..{MAX_POD_ID} "
        "(another tool's data?); the link was not changed"
    )


def _nil(_reply: Any) -> None:
    return None


def _optional_text(raw: bytes | None) -> str | None:
    return None if raw is None else _text(raw)


def pod_states(flat: list[bytes]) -> dict[int, str]:
    # Fields that are not decimal pod ids (another tool's data) are not pods: skip them. Where two
    # fields name one pod ("1" and "01"), the one written as the daemon writes it wins, whatever
    # order Redis lists them in.
    states: dict[int, str] = {}
    for i in range(0, len(flat), 2):
        pod = parse_pod_id(flat[i])
        if pod is None:
            continue
        if flat[i] == b"%d" % pod:
            states[pod] = _text(flat[i + 1])
        else:
            states.setdefault(pod, _text(flat[i + 1]))
    return states


def _link_services(flat: list[bytes]) -> dict[str, int]:
    links: dict[str, int] = {}
    for i in range(0, len(flat), 2):
        pod = parse_pod_id(flat[i + 1])
        if pod is not None:
            links[_text(flat[i])] = pod
    return links


def _try_set_result(reply: list[Any]) -> tuple[bool, int]:
    ok, current = reply
    return (True, int(current)) if ok else (False, _held_pod_id(current))


async def _configuration_problem(transport: Transport, error: ReplyError) -> str:
    """What to change, in one line, for an error reply at start-up that retrying cannot mend."""
    if error.kind == "NOAUTH":
        return (f"Redis requires a password: set {PASSWORD_ENV} or --redis-password-file "
                "(and --redis-username for an ACL user)")
    if error.kind == "NOPERM":
        return f"the Redis user lacks a permission the daemon needs: {error.reply[:200]}"
    try:
        info = await asyncio.wait_for(transport.execute_any("INFO", "server"), HEALTH_TIMEOUT_S)
    except (Unavailable, TimeoutError, ReplyError):
        info = b""
    if b"redis_mode:sentinel" in bytes(info or b""):
        return ("that address is a Redis Sentinel, not a Redis server: name the Sentinels as "
                "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME")
    return f"Redis refused the daemon's set-up: {error.reply[:200]}"


class Executor:
    def __init__(
        self,
        transport: Transport,
        scripts: Scripts,
        keys: Keys,
        *,
        routable_states: Sequence[str] = ("Ready",),
        load_stale_ms: int = 10_000,
        gone_states: Sequence[str] = ("Down",),
        gone_after_ms: int = 30_000,
        alive_cache_ms: int = 0,
    ) -> None:
        self._redis = transport
        self._scripts = scripts
        self.keys = keys
        self._routable_states = tuple(routable_states)
        self._gone_states = tuple(gone_states)
        self._load_stale_ms = load_stale_ms
        self._gone_after_ms = gone_after_ms
        self.rules = PodRules(self._routable_states, self._gone_states, load_stale_ms, gone_after_ms)
        # (ns, service, pod) -> until when (monotonic) a pod judged alive is taken as alive unread.
        self._alive_cache_s = alive_cache_ms / 1000
        self._alive: dict[tuple[str, str, int], float] = {}
        # pick_pod's ARGV after the linked pod: the bounds, then (after the two random numbers)
        # the routable and the gone states.
        self._judge_args = (len(self._routable_states), *self._routable_states, *self._gone_states)
        self._warned_unreadable_previous = False
        # route_user's answers by outcome, for the metrics.
        self.route_outcomes = dict.fromkeys(ROUTE_OUTCOMES, 0)

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
                    transport, scripts, keys, routable_states=config.routable_state,
                    load_stale_ms=config.load_stale_ms, gone_states=config.gone_state,
                    gone_after_ms=config.gone_after_ms, alive_cache_ms=config.alive_cache_ms,
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
                if isinstance(exc, ReplyError) and not isinstance(exc, Unavailable):
                    # NOAUTH, NOPERM, a Sentinel's "unknown command": no retry mends it.
                    assert transport is not None
                    problem = await _configuration_problem(transport, exc)
                    await transport.close()
                    raise ValueError(problem) from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if transport is not None:
                        await transport.close()
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
    def transport(self) -> Transport:
        return self._redis

    @property
    def script_reloads(self) -> int:
        return self._scripts.reloads

    def transport_stats(self) -> dict[str, int]:
        """The transport's counters for the metrics: commands, writes (and switches, Sentinel)."""
        return self._redis.stats()

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

    def _script(self, name: str, keys: Sequence[str], *args: Any, decode: Any = None) -> Awaitable[Any]:
        return self._scripts.run(self._redis, name, keys, args, decode)

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET across nodes: one command per node (its keys), never one per key."""
        values: list[bytes | None] = [None] * len(keys)
        groups = self._redis.group_by_node(keys)
        replies = await asyncio.gather(*[self._redis.execute(keys[g[0]], "MGET", *[keys[i] for i in g])
                                         for g in groups])
        for group, reply in zip(groups, replies, strict=True):
            for index, value in zip(group, reply, strict=True):
                values[index] = value
        return values

    # --- pod and workload states -------------------------------------------------------------

    def set_service_state(self, ns: str, service: str, pod_id: int, state: str) -> Awaitable[None]:
        key = self.keys.service_state(ns, service)
        return self._redis.execute(key, "HSET", key, pod_id, state, decode=_nil)

    def get_service_state(self, ns: str, service: str) -> Awaitable[dict[int, str]]:
        key = self.keys.service_state(ns, service)
        return self._redis.execute(key, "HGETALL", key, decode=pod_states)

    def set_workload_state(self, ns: str, service: str, state: str) -> Awaitable[None]:
        key = self.keys.workload_state(ns, service)
        return self._redis.execute(key, "SET", key, state, decode=_nil)

    def get_workload_state(self, ns: str, service: str) -> Awaitable[str | None]:
        key = self.keys.workload_state(ns, service)
        return self._redis.execute(key, "GET", key, decode=_optional_text)

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
        pod = parse_pod_id(raw)
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

    def set_linked_pod(self, ns: str, uid: str, service: str, pod_id: int,
                       persist_seconds: int) -> Awaitable[int | None]:
        return self._script("set_linked_pod", self._link_keys(ns, uid, service), service, pod_id, persist_seconds,
                            decode=self._previous_pod_id)

    def try_set_linked_pod(self, ns: str, uid: str, service: str, pod_id: int,
                           persist_seconds: int) -> Awaitable[tuple[bool, int]]:
        return self._script("try_set_linked_pod", self._link_keys(ns, uid, service), service, pod_id,
                            persist_seconds, decode=_try_set_result)

    def set_linked_pod_if_absent(self, ns: str, uid: str, service: str, pod_id: int,
                                 persist_seconds: int) -> Awaitable[int]:
        return self._script("set_linked_pod_if_absent", self._link_keys(ns, uid, service), service, pod_id,
                            persist_seconds, decode=_held_pod_id)

    def get_linked_pod(self, ns: str, uid: str, service: str) -> Awaitable[int | None]:
        key = self.keys.link(ns, uid, service)
        return self._redis.execute(key, "GET", key, decode=_pod_id)

    def get_linked_pod_if_persist(self, ns: str, uid: str, service: str) -> Awaitable[int | None]:
        return self._script("get_linked_pod_if_persist", self._link_keys(ns, uid, service), decode=_pod_id)

    async def batch_get_linked_pod(self, ns: str, uids: list[str], service: str) -> dict[int, list[str]]:
        # A user whose link holds no pod id (another tool's value, a key of another type, which
        # MGET reads as nil) is left out, as an unlinked one: one user's foreign data must not fail
        # the answer for all the others. get_linked_pod for that user answers INTERNAL.
        unique = list(dict.fromkeys(uids))
        values = await self._mget([self.keys.link(ns, uid, service) for uid in unique])
        by_pod: dict[int, list[str]] = {}
        for uid, raw in zip(unique, values, strict=True):
            pod = None if raw is None else parse_pod_id(raw)
            if pod is not None:
                by_pod.setdefault(pod, []).append(uid)
        return by_pod

    def remove_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int) -> Awaitable[bool]:
        return self._script("remove_linked_pod", self._link_keys(ns, uid, service), service, persist_seconds,
                            decode=bool)

    def remove_linked_pod_with_id(self, ns: str, uid: str, service: str, persist_seconds: int,
                                  pod_id: int) -> Awaitable[bool]:
        return self._script("remove_linked_pod_with_id", self._link_keys(ns, uid, service), service,
                            persist_seconds, pod_id, decode=bool)

    async def read_link(self, ns: str, uid: str, service: str) -> tuple[int | None, bool | None]:
        """(pod, persistent) of the user's link, (None, None) without one or with a value that is
        not a pod id (a watch has nothing to say about another tool's value)."""
        key = self.keys.link(ns, uid, service)
        raw, ttl_ms = await asyncio.gather(self._redis.execute(key, "GET", key),
                                           self._redis.execute(key, "PTTL", key))
        pod = None if raw is None else parse_pod_id(raw)
        return (None, None) if pod is None else (pod, ttl_ms == -1)

    def get_link_service(self, ns: str, uid: str) -> Awaitable[dict[str, int]]:
        key = self.keys.link_hash(ns, uid)
        return self._redis.execute(key, "HGETALL", key, decode=_link_services)

    # --- placement (contract section 2b) -----------------------------------------------------

    def report_pod_load(self, ns: str, service: str, pod_id: int, load: int) -> Awaitable[None]:
        key = self.keys.pod_load(ns, service)
        return self._script("report_pod_load", (key,), pod_id, load, decode=_nil)

    async def compute_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int) -> int | None:
        routed = await self.route_user(ns, uid, service, persist_seconds)
        return routed["pod_id"]  # type: ignore[no-any-return]

    # --- liveness and failover (contract section 2c) -----------------------------------------

    def route_user(self, ns: str, uid: str, service: str, persist_seconds: int) -> Awaitable[dict[str, Any]]:
        """Keep the user on an alive pod, place a new user, move a user whose pod is gone.

        Three steps on two slots: read the link (user's slot); judge its pod and pick if it is
        gone or absent (service's slot, pick_pod); replace the link only if it still holds what
        was read (user's slot, replace_linked_pod). The compare-and-set is what makes concurrent
        callers agree: one of them writes, the others read back what it wrote.

        Each step's decoder hands over to the next (``Then``), so a user who stays costs two
        commands and no coroutine; only a write (placing, moving) runs one.
        """
        link_key = self.keys.link(ns, uid, service)

        def decide(raw: bytes | None) -> dict[str, Any] | Then:
            linked = _pod_id(raw)
            if linked is not None and self._alive.get((ns, service, linked), 0.0) > time.monotonic():
                return self._routed("kept", linked, linked)
            return Then(self._judge_and_pick(ns, uid, service, persist_seconds, raw, linked))

        return self._redis.execute(link_key, "GET", link_key, decode=decide)

    def _judge_and_pick(self, ns: str, uid: str, service: str, persist_seconds: int, raw: bytes | None,
                        linked: int | None) -> Awaitable[dict[str, Any]]:
        def judged(verdict: Any) -> dict[str, Any] | Then:
            if verdict == 0:
                self._remember_alive(ns, service, linked)
                return self._routed("kept", linked, linked)
            if verdict is None:
                return self._routed("none", None, linked)
            return Then(self._relink(ns, uid, service, persist_seconds, raw, linked, int(verdict)))

        return self._script(
            "pick_pod", (self.keys.service_state(ns, service), self.keys.pod_load(ns, service)),
            b"" if linked is None else b"%d" % linked, self._load_stale_ms, self._gone_after_ms, random.random(),
            random.random(), *self._judge_args, decode=judged)

    async def _relink(self, ns: str, uid: str, service: str, persist_seconds: int, raw: bytes | None,
                      linked: int | None, picked: int) -> dict[str, Any]:
        written, current = await self._script(
            "replace_linked_pod", self._link_keys(ns, uid, service), service, raw or b"", picked, persist_seconds)
        if written:
            return self._routed("placed" if linked is None else "moved", picked, linked)
        if current is not None:  # another caller linked the user meanwhile: that link wins
            now = _held_pod_id(current)
            return self._routed("kept", now, now)
        # The link was removed meanwhile: route the user again, as one with no link (that
        # compare-and-set expects no link, so it writes or finds another caller's: no third turn).
        return await self._judge_and_pick(ns, uid, service, persist_seconds, None, None)

    def _remember_alive(self, ns: str, service: str, pod: int | None) -> None:
        if not self._alive_cache_s or pod is None:
            return
        if len(self._alive) >= _ALIVE_CACHED:
            self._alive.clear()
        self._alive[(ns, service, pod)] = time.monotonic() + self._alive_cache_s

    def forget_alive(self, ns: str, service: str, pod_id: int) -> None:
        """This daemon is about to make the pod gone: no cached verdict may outlive that."""
        self._alive.pop((ns, service, pod_id), None)

    def _routed(self, outcome: str, pod_id: int | None, previous: int | None) -> dict[str, Any]:
        self.route_outcomes[outcome] += 1
        return {"pod_id": pod_id, "previous": previous, "outcome": outcome}

    def hold_pod(self, ns: str, service: str, pod_id: int, state: str, load: int) -> Awaitable[None]:
        """The state and a fresh load report of a held pod, in one script."""
        return self._script("hold_pod", (self.keys.service_state(ns, service), self.keys.pod_load(ns, service)),
                            pod_id, state, load, decode=_nil)

    def mark_pod_down(self, ns: str, service: str, pod_id: int) -> Awaitable[None]:
        """The first gone state as the pod's state: its last holder is gone."""
        self.forget_alive(ns, service, pod_id)
        return self.set_service_state(ns, service, pod_id, self._gone_states[0])

    async def describe_pods(self, ns: str, service: str) -> list[dict[str, Any]]:
        """Every pod of the service as route_user judges it, for an operator (`statefuld pods`)."""
        pods = await read_pods(self._redis, self.keys, ns, service)
        return [self.rules.judge(pod, pods.states.get(pod), pods.reports.get(pod), pods.now_ms)
                for pod in sorted(pods.states.keys() | pods.reports.keys())]


@dataclass(frozen=True)
class Pods:
    """A service's pods as Redis holds them: states, readable load reports (load, unix ms), and
    Redis's clock when they were read."""

    states: dict[int, str]
    reports: dict[int, tuple[int, int]]
    now_ms: int


async def read_pods(redis: Transport, keys: Keys, ns: str, service: str) -> Pods:
    state_key, load_key = keys.service_state(ns, service), keys.pod_load(ns, service)
    flat_states, flat_loads, now = await asyncio.gather(
        redis.execute(state_key, "HGETALL", state_key),
        redis.execute(state_key, "HGETALL", load_key),
        redis.execute(state_key, "TIME"))
    reports: dict[int, tuple[int, int]] = {}
    for i in range(0, len(flat_loads), 2):
        pod, report = parse_pod_id(flat_loads[i]), parse_report(flat_loads[i + 1])
        if pod is not None and report is not None:
            reports[pod] = report
    return Pods(pod_states(flat_states), reports, int(now[0]) * 1000 + int(now[1]) // 1000)


@dataclass(frozen=True)
class PodRules:
    """How a pod is judged (contract section 2c): the rules of pick_pod.lua, in words an operator
    reads (`statefuld pods`, `statefuld audit`)."""

    routable_states: tuple[str, ...]
    gone_states: tuple[str, ...]
    load_stale_ms: int
    gone_after_ms: int

    @classmethod
    def of(cls, config: Config) -> PodRules:
        return cls(config.routable_state, config.gone_state, config.load_stale_ms, config.gone_after_ms)

    def judge(self, pod: int, state: str | None, report: tuple[int, int] | None, now_ms: int) -> dict[str, Any]:
        age_ms = None if report is None else now_ms - report[1]
        if state is None:
            status, why = "gone", "no state"
        elif state in self.gone_states:
            status, why = "gone", f"state {state} is a gone state"
        elif age_ms is not None and age_ms >= self.gone_after_ms:
            status, why = "gone", f"load report {age_ms} ms old (--gone-after-ms {self.gone_after_ms})"
        elif state not in self.routable_states:
            status, why = "alive", f"state {state} is not routable: keeps its users, gets no new ones"
        elif age_ms is None:
            status, why = "alive", "no load report: keeps its users, gets no new ones"
        elif age_ms >= self.load_stale_ms:
            status, why = "alive", f"load report {age_ms} ms old (--load-stale-ms {self.load_stale_ms}): " \
                                   "keeps its users, gets no new ones"
        else:
            status, why = "eligible", "routable with a fresh load report"
        return {"pod_id": pod, "state": state, "load": None if report is None else report[0],
                "report_age_ms": age_ms, "status": status, "why": why}


def parse_report(raw: bytes) -> tuple[int, int] | None:
    """(load, unix ms) of a load report "<load>:<unix ms>", None for another tool's value."""
    load, sep, stamp = raw.partition(b":")
    if not sep or not load.isdigit() or not stamp.isdigit():
        return None
    return int(load), int(stamp)
