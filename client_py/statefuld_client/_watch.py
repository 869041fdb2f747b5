"""Watches: a service's pod and workload changes, or its link changes, as an iterator of events on
a connection of its own (docs/CLIENT.md, "Watching").

`AsyncWatch` does the work; `Watch` runs one on a private loop in a daemon thread for blocking
programs. Both deliver events in order, hold at most ``buffer_events`` unread (then they stop
reading, and the daemon's own bound turns a watcher that does not keep up into a gap), and after
a daemon restart connect again and yield a ``snapshot`` (service) or ``gap`` (links) event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Generator
from types import TracebackType
from typing import Any

from statefuld_client import _core as core
from statefuld_client._loop_thread import LoopThread
from statefuld_client.errors import ConnectionLostError, InvalidArgumentError, StatefuldError

Event = dict[str, Any]

_REWATCH_FIRST_S = 0.02
_REWATCH_MAX_S = 0.25
_LOST = object()  # the reader's word that the connection ended
BUFFER_EVENTS = 1000


class AsyncWatch:
    """``async for event in client.watch_service(ns, service)`` (or ``watch_links``).

    Each event is a map as docs/PROTOCOL.md ("Watch") lists them. The first event of a service
    watch is its current state, as a ``snapshot``. Stop with `aclose` (or leave ``async with``).
    """

    def __init__(self, socket_path: str, timeout_s: float, method: str, ns: str, service: str,
                 buffer_events: int = BUFFER_EVENTS) -> None:
        self._path = socket_path
        self._timeout_s = timeout_s
        self._method = method
        self._params = [ns, service]
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer_events)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self.watch_id: int | None = None
        self.reconnects = 0

    def __aiter__(self) -> AsyncWatch:
        return self

    def __await__(self) -> Generator[Any, None, AsyncWatch]:
        return self.start().__await__()

    async def start(self) -> AsyncWatch:
        """Make the watch call now (``await client.watch_links(...)`` does): every change made
        after this returns is delivered. ``async for`` alone makes it at the first iteration."""
        if not self._started:
            self._started = True
            await self._open(first=True)
        return self

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        while True:
            item = await self._queue.get()
            if item is not _LOST:
                return item  # type: ignore[no-any-return]
            if self._closed:
                raise StopAsyncIteration
            await self._rewatch()

    async def aclose(self) -> None:
        """Stop watching: the connection closes, which ends the watch in the daemon. Idempotent."""
        self._closed = True
        await self._disconnect()

    async def _rewatch(self) -> None:
        """The connection ended (a daemon restart): watch again until it works, then tell the
        caller to re-read what it knows."""
        await self._disconnect()
        delay_s = _REWATCH_FIRST_S
        while not self._closed:
            try:
                await self._open(first=False)
                self.reconnects += 1
                return
            except InvalidArgumentError:
                raise  # accepted before, refused by this daemon: no retry can mend it
            except StatefuldError:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _REWATCH_MAX_S)
        raise StopAsyncIteration

    async def _open(self, *, first: bool) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(self._path)
        except OSError as exc:
            raise core.connect_error(self._path, exc) from exc
        except TimeoutError as exc:
            raise core.timed_out_connecting(self._method) from exc
        self._writer = writer
        decoder = core.Decoder()
        writer.write(core.Encoder().request(1, self._method, self._params))
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await self._answer(reader, decoder)
        except BaseException:
            await self._disconnect()
            raise
        self.watch_id = result["watch_id"]
        if self._method == "watch_service":
            # The answer is the snapshot: the first event, and again after every reconnection.
            await self._queue.put({"kind": "snapshot", "states": result["states"], "workload": result["workload"]})
        elif not first:
            await self._queue.put({"kind": "gap"})
        self._reader_task = asyncio.create_task(self._read(reader, decoder))

    async def _answer(self, reader: asyncio.StreamReader, decoder: core.Decoder) -> dict[str, Any]:
        while True:
            data = await reader.read(core.RECV_SIZE)
            if not data:
                raise ConnectionLostError(f"{self._method}: the daemon closed the connection before answering")
            decoder.feed(data)
            while (message := decoder.next_message()) is not None:
                if message[0] == core.RESPONSE:
                    return core.unwrap(message)  # type: ignore[no-any-return]
                await self._event(message)

    async def _read(self, reader: asyncio.StreamReader, decoder: core.Decoder) -> None:
        try:
            while data := await reader.read(core.RECV_SIZE):
                decoder.feed(data)
                while (message := decoder.next_message()) is not None:
                    if message[0] == core.NOTIFICATION:
                        await self._event(message)  # waits while the caller has enough unread
        except (OSError, StatefuldError):
            pass
        await self._queue.put(_LOST)

    async def _event(self, message: list[Any]) -> None:
        method, params = message[1], message[2]
        if method == "watch_event" and type(params) is list and len(params) == 2 and params[0] == self.watch_id:
            await self._queue.put(params[1])

    async def _disconnect(self) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._closed:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_LOST)


class Watch:
    """``for event in client.watch_service(ns, service)`` (or ``watch_links``), for blocking
    programs: an `AsyncWatch` run by a daemon thread of its own. Close it (or leave ``with``) to
    stop watching; a forked child does not inherit it.
    """

    def __init__(self, socket_path: str, timeout_s: float, method: str, ns: str, service: str) -> None:
        self._thread = LoopThread(f"statefuld-{method}")
        self._closed = False
        try:
            self._watch: AsyncWatch = self._thread.run(self._make(socket_path, timeout_s, method, ns, service),
                                                       "watch")
        except BaseException:
            self._thread.stop()
            raise

    @staticmethod
    async def _make(*args: Any) -> AsyncWatch:
        return await AsyncWatch(*args)  # watching when the constructor returns

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        try:
            return self._thread.run(self._watch.__anext__(), "watch")
        except (StopAsyncIteration, concurrent.futures.CancelledError):  # ended, or closed meanwhile
            raise StopIteration from None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop watching (a `next` blocked in another thread ends too). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.forked:
            return
        try:
            self._thread.run(self._watch.aclose(), "watch")
        finally:
            self._thread.stop()
