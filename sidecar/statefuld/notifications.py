"""Redis keyspace notifications for the watches: one pub/sub connection per primary, subscribed
to exactly the channels and patterns some watch needs, following the topology the daemon follows.

Each connection, when it (re)connects, first makes sure Redis publishes what the watches need
(``notify-keyspace-events`` holding ``NEEDED``: CONFIG GET, then CONFIG SET adding what lacks,
never removing a class). Where CONFIG is refused (a managed Redis), a probe key's own events show
whether notifications arrive. Then it subscribes to everything needed. Whenever a connection had
to be made again, or the primaries changed, ``on_gap`` tells the watches they may have missed
events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from statefuld.errors import FailedPrecondition, Unavailable
from statefuld.redis_mux import Endpoint, RedisMux, ReplyError
from statefuld.transports import Transport

log = logging.getLogger("statefuld.notifications")

# K: keyspace channels; g: DEL, EXPIRE, RENAME...; $: string commands; h: hash commands;
# x: keys expired by Redis.
NEEDED = "Kg$hx"
_ALL = "g$lshzxetd"  # what the class "A" stands for
# How often the topology is compared with the subscriptions while any are needed.
FOLLOW_INTERVAL_S = 0.5
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
# Well inside a request's deadline: the events of a probe come within milliseconds when they come.
_PROBE_TIMEOUT_S = 0.5
# A probe that failed is believed this long: watch calls meanwhile fail at once.
_PROBE_FAILED_FOR_S = 5.0
# The probe key (only where CONFIG is refused): under the prefix, outside the layout, short-lived.
PROBE_MARK = "__statefuld_probe__"

# (pattern or None, channel, event name, monotonic time it arrived)
OnMessage = Callable[[bytes | None, bytes, bytes, float], None]


def missing_classes(current: str) -> str:
    have = set(current.replace("A", _ALL))
    return "".join(c for c in NEEDED if c not in have)


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def ensure_keyspace_events(execute: Callable[..., Awaitable[Any]], where: str) -> str | None:
    """Make the node publish what the watches need (adding the classes that lack, never removing
    one); None when it does, else why that could not be made sure (CONFIG refused)."""
    try:
        reply = await execute("CONFIG", "GET", "notify-keyspace-events")
        current = reply[1].decode() if reply else ""
    except ReplyError as exc:
        return f"CONFIG GET was refused ({exc.reply[:100]})"
    missing = missing_classes(current)
    if not missing:
        return None
    try:
        await execute("CONFIG", "SET", "notify-keyspace-events", current + missing)
    except ReplyError as exc:
        return (f"notify-keyspace-events is {current!r}, lacking {missing!r}, and CONFIG SET was refused "
                f"({exc.reply[:100]})")
    log.info("added %r to notify-keyspace-events on %s (was %r) for the watches", missing, where, current,
             extra={"event": "keyspace_events_set"})
    return None


async def check_at_start(transport: Transport) -> None:
    """At start: every primary publishes what watches need, or the log says why not (the first
    watch then probes). Never fails the start: the daemon serves everything else either way."""
    try:
        for execute, endpoint in zip(transport.primaries(), transport.primary_endpoints(), strict=False):
            refused = await ensure_keyspace_events(execute, endpoint.describe())
            if refused:
                log.warning("watches may not work: %s; the first watch call will probe whether keyspace "
                            "notifications arrive", refused, extra={"event": "keyspace_events_refused"})
                return
    except (Unavailable, ReplyError) as exc:
        log.warning("could not check notify-keyspace-events at start: %s", exc)


class _Subscriber:
    """One primary's pub/sub connection."""

    def __init__(self, endpoint: Endpoint, owner: Notifications) -> None:
        self.endpoint = endpoint
        self._owner = owner
        self.mux = RedisMux(endpoint, push=owner.deliver, on_lost=self._lost)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.config_refused: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self, first: bool) -> None:
        self._task = asyncio.create_task(self._connect(first))

    async def _connect(self, first: bool) -> None:
        delay_s = _RETRY_FIRST_S
        while not self._closed:
            try:
                await self._check_config()
                for name, pattern in self._owner.wanted():
                    try:
                        await self.mux.execute("PSUBSCRIBE" if pattern else "SUBSCRIBE", name)
                    except ReplyError as exc:
                        if exc.kind != "NOPERM" or isinstance(exc, Unavailable):
                            raise
                        # Not allowed by ACL: the watch call that wants it is told so (add).
            except (Unavailable, ReplyError) as exc:
                if not self._closed:
                    self._owner.failed(f"{self.endpoint.describe()}: {exc}")
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RETRY_MAX_S)
                continue
            if not self.ready.done():
                self.ready.set_result(None)
            if not first:
                self._owner.resubscribed(self)
            return

    async def _check_config(self) -> None:
        self.config_refused = await ensure_keyspace_events(self.mux.execute, self.endpoint.describe())

    def _lost(self) -> None:
        if self._closed:
            return
        self._owner.reconnects += 1
        log.warning("watch subscription to %s lost; subscribing again", self.endpoint.describe(),
                    extra={"event": "subscription_lost"})
        self.ready = asyncio.get_running_loop().create_future()
        self.start(first=False)

    async def close(self) -> None:
        self._closed = True
        if not self.ready.done():  # a watch call waiting on it hears so, rather than its deadline
            self.ready.set_exception(Unavailable(f"the subscription to {self.endpoint.describe()} was closed"))
            self.ready.exception()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.mux.close()


class Notifications:
    """The daemon's subscriptions: reference-counted channels and patterns, on every primary."""

    def __init__(self, transport: Transport, on_message: OnMessage, on_gap: Callable[[], None], *,
                 prefix: str) -> None:
        self._transport = transport
        self._on_message = on_message
        self._on_gap = on_gap
        self._prefix = prefix
        self._channels: dict[str, int] = {}
        self._patterns: dict[str, int] = {}
        self._subscribers: dict[str, _Subscriber] = {}
        self._topology = -1
        self._follow: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._probe: tuple[str, set[bytes], asyncio.Event] | None = None
        self.verified = False  # notifications seen to arrive (CONFIG said so, or the probe saw them)
        self.problem: str | None = None
        self._probed_at = -1e9
        self.reconnects = 0
        self._failure_logged_s = -1.0

    # --- names -----------------------------------------------------------------------------------

    def channel(self, key: str, db: int = 0) -> str:
        return f"__keyspace@{db}__:{key}"

    def db(self) -> int:
        endpoints = self._transport.primary_endpoints()
        return endpoints[0].db if endpoints else 0

    # --- what the watches need -------------------------------------------------------------------

    def wanted(self) -> list[tuple[str, bool]]:
        return [(c, False) for c in self._channels] + [(p, True) for p in self._patterns]

    async def add(self, name: str, pattern: bool) -> None:
        """Subscribe on every primary; returns once every one confirmed (the watch call's answer
        waits for it). Raises FailedPrecondition when notifications cannot be had."""
        # One change of the subscriptions at a time: a close that went on while another watch
        # subscribed would leave that watch answered with no subscription under it.
        async with self._lock:
            await self._add(name, pattern)

    async def remove(self, name: str, pattern: bool) -> None:
        async with self._lock:
            await self._remove(name, pattern)

    async def _add(self, name: str, pattern: bool) -> None:
        table = self._patterns if pattern else self._channels
        table[name] = table.get(name, 0) + 1
        if table[name] > 1:
            await self._all_ready()
            return
        try:
            await self._ensure_subscribers()
            await self._all_ready()
            await asyncio.gather(*(s.mux.execute("PSUBSCRIBE" if pattern else "SUBSCRIBE", name)
                                   for s in self._subscribers.values()))
            await self._verify()
        except ReplyError as exc:
            await self._remove(name, pattern)
            if exc.kind != "NOPERM":
                raise
            raise FailedPrecondition(
                f"the Redis user may not {'PSUBSCRIBE' if pattern else 'SUBSCRIBE'} to {name!r}: grant it +@pubsub "
                f"and the channel permission &{name} (ACL patterns are matched literally for PSUBSCRIBE), or &*"
            ) from exc
        except BaseException:
            await self._remove(name, pattern)
            raise

    async def _remove(self, name: str, pattern: bool) -> None:
        table = self._patterns if pattern else self._channels
        left = table.get(name, 0) - 1
        if left > 0:
            table[name] = left
            return
        table.pop(name, None)
        if not self._channels and not self._patterns:
            await self._close()  # nothing needed: no connection kept either
            return
        for subscriber in list(self._subscribers.values()):
            if subscriber.ready.done():
                with contextlib.suppress(Unavailable, ReplyError):
                    await subscriber.mux.execute("PUNSUBSCRIBE" if pattern else "UNSUBSCRIBE", name)

    async def _all_ready(self) -> None:
        waiting = [s.ready for s in self._subscribers.values()]
        if waiting:
            await asyncio.gather(*(asyncio.shield(w) for w in waiting))
        if self.problem is not None and not self.verified:
            raise FailedPrecondition(self.problem)

    async def _ensure_subscribers(self) -> None:
        if self._follow is None:
            self._follow = asyncio.create_task(self._follow_topology())
        self._reconcile()
        if not self._subscribers:
            raise Unavailable("no Redis primary is known now to subscribe to")

    def _reconcile(self) -> bool:
        """Subscribers for exactly the current primaries; True if that changed anything."""
        endpoints = {e.describe(): e for e in self._transport.primary_endpoints()}
        if not endpoints and self._subscribers:
            return False  # between two primaries (a failover): keep trying the old until one is named
        changed = self._transport.topology_changes != self._topology and self._topology != -1
        self._topology = self._transport.topology_changes
        first = not self._subscribers
        for where in set(self._subscribers) - set(endpoints):
            closing = asyncio.create_task(self._subscribers.pop(where).close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            changed = True
        for where, endpoint in endpoints.items():
            if where not in self._subscribers:
                subscriber = self._subscribers[where] = _Subscriber(endpoint, self)
                subscriber.start(first=True)
                changed = changed or not first
        return changed

    async def _follow_topology(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            if self._reconcile():
                await asyncio.gather(*(asyncio.shield(s.ready) for s in self._subscribers.values()),
                                     return_exceptions=True)
                log.info("watch subscriptions follow a topology change", extra={"event": "subscriptions_moved"})
                self._on_gap()

    # --- checking that notifications arrive --------------------------------------------------------

    async def _verify(self) -> None:
        refused = [s.config_refused for s in self._subscribers.values() if s.config_refused]
        if not refused:
            self.verified, self.problem = True, None
            return
        if self.verified:
            return
        if self.problem is not None and time.monotonic() - self._probed_at < _PROBE_FAILED_FOR_S:
            raise FailedPrecondition(self.problem)
        missing = await self._run_probe()
        self._probed_at = time.monotonic()
        if not missing:
            self.verified, self.problem = True, None
            log.info("keyspace notifications arrive (probed; %s)", refused[0])
            return
        self.problem = (f"Redis does not publish the keyspace notifications watches need: set "
                        f"notify-keyspace-events to include {NEEDED!r} (events {', '.join(sorted(missing))} did "
                        f"not arrive; {refused[0]})")
        raise FailedPrecondition(self.problem)

    async def _run_probe(self) -> set[str]:
        """Write a probe key of our own and wait for its events; the event names that did not come."""
        key = f"{self._prefix}:{PROBE_MARK}:{os.urandom(6).hex()}"
        channel = self.channel(key, self.db())
        expected = {b"hset", b"del", b"set", b"expired"}
        seen: set[bytes] = set()
        event = asyncio.Event()
        self._probe = (channel, seen, event)
        try:
            await asyncio.gather(*(s.mux.execute("SUBSCRIBE", channel) for s in self._subscribers.values()))
            execute: Callable[..., Awaitable[Any]] = self._transport.execute
            await execute(key, "HSET", key, "probe", "1")
            await execute(key, "DEL", key)
            await execute(key, "SET", key, "1", "PX", 1)
            deadline = time.monotonic() + _PROBE_TIMEOUT_S
            while not expected <= seen and time.monotonic() < deadline:
                await execute(key, "EXISTS", key)  # an access expires the key at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 0.05)
                event.clear()
            return {e.decode() for e in expected - seen}
        finally:
            self._probe = None
            for s in self._subscribers.values():
                with contextlib.suppress(Unavailable, ReplyError):
                    await s.mux.execute("UNSUBSCRIBE", channel)

    # --- from the connections --------------------------------------------------------------------

    def deliver(self, message: list[Any]) -> None:
        now = time.monotonic()
        if message[0] == b"pmessage":
            pattern, channel, event = message[1], message[2], message[3]
        else:
            pattern, channel, event = None, message[1], message[2]
        probe = self._probe
        if probe is not None and channel == probe[0].encode():
            probe[1].add(event)
            probe[2].set()
            return
        self._on_message(pattern, channel, event, now)

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._failure_logged_s >= 1.0:
            self._failure_logged_s = now
            log.warning("watch subscription not in place yet: %s", reason)

    def resubscribed(self, subscriber: _Subscriber) -> None:
        self._on_gap()

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        follow, self._follow = self._follow, None
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        self._topology = -1
        if follow is not None:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
        await asyncio.gather(*(s.close() for s in subscribers))
