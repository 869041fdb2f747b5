"""Client for the statefuld sidecar: blocking `Client` and asyncio `AsyncClient`, same methods.

Example::

    from statefuld_client import Client

    with Client() as client:                       # socket: STATEFULD_SOCKET or the default path
        client.set_linked_pod("game", "alice", "lobby", 3, -1)
        client.get_linked_pod("game", "alice", "lobby")          # 3

Errors are documented in `statefuld_client.errors`; all derive from `StatefuldError`.
"""

from statefuld_client._async_client import AsyncClient
from statefuld_client._hold import AsyncPodHold, PodHold
from statefuld_client._paths import default_socket_path
from statefuld_client._sync_client import Client
from statefuld_client._watch import AsyncWatch, Watch
from statefuld_client.errors import (
    ClientClosedError,
    ClientTimeoutError,
    ConnectionLostError,
    ConnectRefusedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalServerError,
    InvalidArgumentError,
    OverloadedError,
    ProtocolError,
    ServerError,
    SocketNotFoundError,
    StatefuldError,
    TransportError,
    UnavailableError,
    UnknownMethodError,
)

__all__ = [
    "AsyncClient",
    "AsyncPodHold",
    "AsyncWatch",
    "Client",
    "ClientClosedError",
    "ClientTimeoutError",
    "ConnectRefusedError",
    "ConnectionLostError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalServerError",
    "InvalidArgumentError",
    "OverloadedError",
    "PodHold",
    "ProtocolError",
    "ServerError",
    "SocketNotFoundError",
    "StatefuldError",
    "TransportError",
    "UnavailableError",
    "UnknownMethodError",
    "Watch",
    "default_socket_path",
]
