"""Every fault a caller can meet raises the same exception, with the same message, from the
blocking and the asyncio client: the rules live once, in statefuld_client._core.

The far end is a scripted peer (support.peer) or no daemon at all: each fault is made on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import short_tmpdir
from support.peer import Peer, peer

from statefuld_client import AsyncClient, Client, StatefuldError

# What a call raised: its class and its message.
Outcome = tuple[type[BaseException], str]


def sync_outcome(path: str, action: Callable[[Any], Any]) -> Outcome:
    client = Client(path, timeout_s=0.5)
    try:
        action(client)
    except StatefuldError as exc:
        return type(exc), str(exc)
    finally:
        client.close()
    raise AssertionError("no exception")


def async_outcome(path: str, action: Callable[[Any], Any]) -> Outcome:
    async def scenario() -> Outcome:
        client = AsyncClient(path, timeout_s=0.5)
        try:
            await action(client)
        except StatefuldError as exc:
            return type(exc), str(exc)
        finally:
            await client.aclose()
        raise AssertionError("no exception")

    return asyncio.run(scenario())


def hang_up(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    conn.shutdown(socket.SHUT_RDWR)  # the daemon went away with the request unanswered


def never_answer(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    pass


def garbage(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    conn.sendall(b"\xc1")


@contextlib.contextmanager
def no_daemon() -> Iterator[str]:
    directory = short_tmpdir("sfx-")
    try:
        yield os.path.join(directory, "missing.sock")
    finally:
        os.rmdir(directory)


@contextlib.contextmanager
def stale_socket() -> Iterator[str]:
    """A socket file nobody accepts on: a daemon that died."""
    directory = short_tmpdir("sfx-")
    path = os.path.join(directory, "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    try:
        yield path
    finally:
        os.unlink(path)
        os.rmdir(directory)


@contextlib.contextmanager
def scripted(handler: Callable[[Peer, int, list[Any], socket.socket], None]) -> Iterator[str]:
    with peer(handler) as p:
        yield p.socket_path


async def _closed_first_async(client: AsyncClient) -> Any:
    await client.aclose()
    return await client.ping()


# Set by the peer once a request has reached it: the call is then waiting for its reply.
REQUEST_ARRIVED = threading.Event()


def note_and_never_answer(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    REQUEST_ARRIVED.set()


def _close_during_sync(client: Client) -> Any:
    REQUEST_ARRIVED.clear()
    threading.Thread(target=lambda: (REQUEST_ARRIVED.wait(5), client.close())).start()
    return client.get_linked_pod("g", "u", "s", timeout_s=5)


async def _close_during_async(client: AsyncClient) -> Any:
    REQUEST_ARRIVED.clear()
    loop = asyncio.get_running_loop()

    def close_once_arrived() -> None:
        REQUEST_ARRIVED.wait(5)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(client.aclose()))

    threading.Thread(target=close_once_arrived).start()
    return await client.get_linked_pod("g", "u", "s", timeout_s=5)


FAULTS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Any]]] = {
    # name: (where the client connects, the sync action, the async action)
    "daemon gone": (no_daemon, lambda c: c.ping(), lambda c: c.ping()),
    "daemon died, its socket left": (stale_socket, lambda c: c.ping(), lambda c: c.ping()),
    "lost after the write, a write": (lambda: scripted(hang_up), lambda c: c.set_linked_pod("g", "u", "s", 1, -1),
                                      lambda c: c.set_linked_pod("g", "u", "s", 1, -1)),
    "lost after the write, a read retried once": (lambda: scripted(hang_up), lambda c: c.get_linked_pod("g", "u", "s"),
                                                  lambda c: c.get_linked_pod("g", "u", "s")),
    "daemon gone, a notification": (no_daemon, lambda c: c.notify("set_service_state", "g", "s", 1, "Ready"),
                             lambda c: c.notify("set_service_state", "g", "s", 1, "Ready")),
    "timeout": (lambda: scripted(never_answer), lambda c: c.get_linked_pod("g", "u", "s", timeout_s=0.2),
                lambda c: c.get_linked_pod("g", "u", "s", timeout_s=0.2)),
    "timeout, the client's default": (lambda: scripted(never_answer), lambda c: c.get_linked_pod("g", "u", "s"),
                                      lambda c: c.get_linked_pod("g", "u", "s")),
    "garbage from the peer": (lambda: scripted(garbage), lambda c: c.ping(), lambda c: c.ping()),
    "closed client": (no_daemon, lambda c: (c.close(), c.ping()), _closed_first_async),
    "closed during the call": (lambda: scripted(note_and_never_answer), _close_during_sync,
                               _close_during_async),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_raises_the_same_error_in_both_flavours(fault: str) -> None:
    where, sync_action, async_action = FAULTS[fault]
    with where() as path:
        sync = sync_outcome(path, sync_action)
        asynchronous = async_outcome(path, async_action)
    assert sync == asynchronous, fault
    # Messages name the path where the fault is the connection's, never the other flavour's words.
    assert "AsyncClient" not in sync[1] and "Client was" not in sync[1]
