"""A pod held by this process: its liveness tied to a connection of its own (docs/CLIENT.md,
"Holding a pod").

`AsyncPodHold` does the work on the caller's event loop; `PodHold` runs one on a private loop in
a daemon thread, so that a blocking program holds its pod without an event loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Generator
from types import TracebackType
from typing import Any

from statefuld_client._async_client import AsyncClient
from statefuld_client._loop_thread import LoopThread
from statefuld_client.errors import ClientClosedError, InvalidArgumentError, StatefuldError

# After the hold's connection is lost (the daemon restarted): hold again after this long, doubling
# up to the cap, until it works. The cap keeps a restarted daemon's wait for its holders short.
_REHOLD_FIRST_S = 0.02
_REHOLD_MAX_S = 0.25

_holds: weakref.WeakSet[AsyncPodHold] = weakref.WeakSet()


def _forked_error() -> StatefuldError:
    return StatefuldError("this pod is held by the parent process; a forked child does not inherit the hold")


class AsyncPodHold:
    """A held pod (`AsyncClient.hold_pod`): while it is open, the daemon refreshes the pod's load
    report every ``--heartbeat-ms``; when it closes, or the process ends, the daemon writes the
    pod's state ``Down`` and `route_user` moves its users.

    After a daemon restart it holds again by itself, with its latest state and load. A forked
    child does not inherit it.

    Example::

        async with client.hold_pod("game", "lobby", 3, "Ready", 0) as hold:
            ...                                 # serve
            await hold.update(load=120)
            await hold.update(state="Draining")  # keeps its users, gets no new ones
    """

    def __init__(self, socket_path: str, timeout_s: float, ns: str, service: str, pod_id: int, state: str,
                 load: int) -> None:
        self.ns, self.service, self.pod_id = ns, service, pod_id
        self.state, self.load = state, load
        self._client = AsyncClient(socket_path, timeout_s=timeout_s)
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._forked = False
        self.reholds = 0  # times it held again after losing its connection
        _holds.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "held" if self._keeper is not None else "not yet held"
        return f"<AsyncPodHold {self.ns}/{self.service} pod {self.pod_id} {self.state!r} {state}>"

    def __await__(self) -> Generator[Any, None, AsyncPodHold]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncPodHold:
        return await self._start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _start(self) -> AsyncPodHold:
        if self._keeper is None:
            try:
                await self._hold()
            except BaseException:
                self._closed = True  # never held: its connection must not linger
                await self._client.aclose()
                raise
            self._keeper = asyncio.create_task(self._keep())
        return self

    async def update(self, *, state: str | None = None, load: int | None = None) -> None:
        """Change the held pod's state or load (both are written at once, with a fresh load report).

        Example: ``await hold.update(state="Draining")``
        """
        if self._closed:
            raise ClientClosedError("this pod hold is closed")
        if self._forked:
            raise _forked_error()
        if state is not None:
            self.state = state
        if load is not None:
            self.load = load
        await self._hold()

    async def aclose(self) -> None:
        """Release the hold: the daemon writes the pod ``Down`` at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not self._forked:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if not self._forked:
            await self._client.aclose()

    async def _hold(self) -> None:
        await self._client._call("hold_pod", [self.ns, self.service, self.pod_id, self.state, self.load], None, False)

    async def _keep(self) -> None:
        """Wait for the hold's connection to end; then hold again, until that works."""
        while True:
            conn = self._client._conn
            if conn is not None and not conn.lost:
                await asyncio.shield(conn.closed)
            delay_s = _REHOLD_FIRST_S
            while True:
                try:
                    await self._hold()
                    self.reholds += 1
                    break
                except InvalidArgumentError:
                    return  # accepted before, refused by this daemon: no retry can mend it
                except StatefuldError:  # the daemon is restarting, or cannot reach Redis yet
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, _REHOLD_MAX_S)


class PodHold:
    """A held pod (`Client.hold_pod`), for blocking programs: an `AsyncPodHold` run by a daemon
    thread of its own. The same guarantees: heartbeats while open, ``Down`` at `close` or when the
    process ends, held again after a daemon restart, not inherited by a forked child.

    Example::

        with client.hold_pod("game", "lobby", 3, "Ready", 0) as hold:
            ...                           # serve
            hold.update(state="Draining")
    """

    def __init__(self, socket_path: str, timeout_s: float, ns: str, service: str, pod_id: int, state: str,
                 load: int) -> None:
        self._thread = LoopThread(f"statefuld-hold-{pod_id}")
        self._closed = False
        try:
            self._hold = self._thread.run(self._make(socket_path, timeout_s, ns, service, pod_id, state, load),
                                          "pod hold")
        except BaseException:
            self._thread.stop()
            raise

    @staticmethod
    async def _make(*args: Any) -> AsyncPodHold:
        return await AsyncPodHold(*args)

    def __repr__(self) -> str:
        return repr(self._hold).replace("<AsyncPodHold", "<PodHold", 1)

    def __enter__(self) -> PodHold:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def state(self) -> str:
        return self._hold.state

    @property
    def load(self) -> int:
        return self._hold.load

    @property
    def closed(self) -> bool:
        return self._closed

    def update(self, *, state: str | None = None, load: int | None = None) -> None:
        """Change the held pod's state or load (see `AsyncPodHold.update`)."""
        if self._closed:
            raise ClientClosedError("this pod hold is closed")
        self._thread.run(self._hold.update(state=state, load=load), "pod hold")

    def close(self) -> None:
        """Release the hold: the daemon writes the pod ``Down`` at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.forked:
            return  # a forked child: the thread and the hold are the parent's
        try:
            self._thread.run(self._hold.aclose(), "pod hold")
        finally:
            self._thread.stop()


def _after_fork_in_child() -> None:
    # The child's AsyncClient forgets the connection itself (its own fork hook); the hold must
    # not try to hold again from the child.
    for hold in list(_holds):
        hold._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)
