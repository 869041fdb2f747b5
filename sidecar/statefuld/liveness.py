"""Pods held by their connections (contract section 2c): heartbeats while a holder is connected,
``Down`` when the last one is gone, nothing when the daemon itself stops.

A hold belongs to a connection (a ``calls.Session``): ``hold`` registers the session as a holder
of the pod and asks the session to call back when it closes. Each held pod has one heartbeat
task that writes the pod's latest load, waits for Redis to take it, then sleeps until the next
beat: a slow or unreachable Redis delays beats, it never queues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from statefuld.config import Config
from statefuld.errors import Overloaded, RpcError
from statefuld.executor import Executor

log = logging.getLogger("statefuld.liveness")

PodKey = tuple[str, str, int]  # (ns, service, pod_id)

# Writing Down while Redis cannot be reached: tried again after this long, doubling up to the cap.
_DOWN_RETRY_S = 0.05
_DOWN_RETRY_MAX_S = 1.0


class Holder(Protocol):
    """calls.Session as a holder: it runs ``on_close`` callbacks when its connection ends."""

    def on_close(self, callback: Callable[[], None], /) -> None: ...


class HeldPod:
    __slots__ = ("beat", "holders", "load")

    def __init__(self, load: int) -> None:
        self.holders: set[Holder] = set()
        self.load = load  # the latest load: from hold_pod or report_pod_load through this daemon
        self.beat: asyncio.Task[None] | None = None


class Holds:
    """Every pod held through this daemon."""

    def __init__(self, executor: Executor, config: Config) -> None:
        self._executor = executor
        self._interval_s = config.heartbeat_ms / 1000
        self._max_pods = config.max_held_pods
        self._down_state = config.gone_state[0]
        self.pods: dict[PodKey, HeldPod] = {}
        self._downs: dict[PodKey, asyncio.Task[None]] = {}
        self._stopped = False
        self.heartbeats = 0
        self.heartbeat_failures = 0
        self.downs_written = 0
        self._failure_logged_s = -1.0

    # --- the methods -----------------------------------------------------------------------------

    async def hold(self, holder: Holder, ns: str, service: str, pod_id: int, state: str, load: int) -> None:
        key = (ns, service, pod_id)
        if key not in self.pods and len(self.pods) >= self._max_pods:
            raise Overloaded(f"{self._max_pods} pods are held through this daemon (--max-held-pods)")
        await self._executor.hold_pod(ns, service, pod_id, state, load)
        if self._stopped:
            return
        pod = self.pods.get(key)
        if pod is None:
            pod = self.pods[key] = HeldPod(load)
            self._cancel_down(key)
            pod.beat = asyncio.create_task(self._beat(key, pod))
        pod.load = load
        if holder not in pod.holders:
            pod.holders.add(holder)
            holder.on_close(lambda: self._release(key, holder))

    def report_pod_load(self, ns: str, service: str, pod_id: int, load: int) -> Awaitable[None]:
        pod = self.pods.get((ns, service, pod_id))
        if pod is not None:
            pod.load = load  # the heartbeats carry it from now on
        return self._executor.report_pod_load(ns, service, pod_id, load)

    # --- holders leaving -------------------------------------------------------------------------

    def _release(self, key: PodKey, holder: Holder) -> None:
        pod = self.pods.get(key)
        if pod is None or self._stopped:
            return
        pod.holders.discard(holder)
        if pod.holders:
            return
        del self.pods[key]
        if pod.beat is not None:
            pod.beat.cancel()
        log.info("pod %d of %s/%s lost its last holder: writing its state %s", key[2], key[0], key[1],
                 self._down_state, extra={"event": "pod_down"})
        self._downs[key] = asyncio.create_task(self._write_down(key))

    async def _write_down(self, key: PodKey) -> None:
        delay_s = _DOWN_RETRY_S
        try:
            while True:
                try:
                    await self._executor.mark_pod_down(*key)
                    self.downs_written += 1
                    return
                except RpcError as exc:
                    self._failed("writing Down for", key, exc)
                # Redis unreachable: keep trying (the report goes stale anyway), unless the pod is
                # held again meanwhile, which cancels this task.
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _DOWN_RETRY_MAX_S)
        finally:
            if self._downs.get(key) is asyncio.current_task():
                del self._downs[key]

    def _cancel_down(self, key: PodKey) -> None:
        down = self._downs.pop(key, None)
        if down is not None:
            down.cancel()

    # --- heartbeats ------------------------------------------------------------------------------

    async def _beat(self, key: PodKey, pod: HeldPod) -> None:
        ns, service, pod_id = key
        next_at = time.monotonic() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            # One interval after this beat began, or at once if Redis took longer than that.
            next_at = time.monotonic() + self._interval_s
            try:
                await self._executor.report_pod_load(ns, service, pod_id, pod.load)
                self.heartbeats += 1
            except RpcError as exc:
                self.heartbeat_failures += 1
                self._failed("the heartbeat of", key, exc)

    def _failed(self, what: str, key: PodKey, exc: RpcError) -> None:
        # Redis down for a minute must not write a line per pod per beat: one a second.
        now = time.monotonic()
        if now - self._failure_logged_s >= 1.0:
            self._failure_logged_s = now
            log.warning("%s pod %d of %s/%s failed: %s", what, key[2], key[0], key[1], exc)

    # --- the daemon stopping ---------------------------------------------------------------------

    async def stop(self) -> None:
        """The daemon stops: no Down for anyone (holders hold again through the next daemon)."""
        self._stopped = True
        tasks = [pod.beat for pod in self.pods.values() if pod.beat is not None] + list(self._downs.values())
        self.pods.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
