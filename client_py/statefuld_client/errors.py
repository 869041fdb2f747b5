"""The client's exceptions: one tree under `StatefuldError`.

::

    StatefuldError
    ├── ServerError                      the daemon answered with an error; .code, .message
    │   ├── InvalidArgumentError         INVALID_ARGUMENT (nothing was written)
    │   ├── UnknownMethodError           UNKNOWN_METHOD
    │   ├── UnavailableError             UNAVAILABLE: the daemon cannot reach Redis
    │   ├── DeadlineExceededError        TIMEOUT: the daemon's deadline passed (also a builtin TimeoutError)
    │   ├── OverloadedError              OVERLOADED: the daemon shed load; retry later
    │   ├── FailedPreconditionError      FAILED_PRECONDITION: this Redis's set-up does not allow the call
    │   └── InternalServerError          INTERNAL
    ├── TransportError                   could not talk to the daemon (also a builtin ConnectionError)
    │   ├── SocketNotFoundError          no socket file at the path: daemon not running, or wrong path
    │   ├── ConnectRefusedError          the socket file exists but nobody accepts (stale socket)
    │   └── ConnectionLostError          the connection broke after the request may have reached the daemon
    ├── ClientTimeoutError               the call's own timeout_s elapsed (also a builtin TimeoutError)
    ├── ProtocolError                    the peer sent something that is not a MessagePack-RPC reply
    └── ClientClosedError                the client was closed (also a builtin RuntimeError)

An error code the client does not know maps to `ServerError` itself, so a newer daemon's
codes are still caught by ``except ServerError``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ClientClosedError",
    "ClientTimeoutError",
    "ConnectRefusedError",
    "ConnectionLostError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalServerError",
    "InvalidArgumentError",
    "OverloadedError",
    "ProtocolError",
    "ServerError",
    "SocketNotFoundError",
    "StatefuldError",
    "TransportError",
    "UnavailableError",
    "UnknownMethodError",
]


class StatefuldError(Exception):
    """Base of every error the client raises."""


class ServerError(StatefuldError):
    """The daemon answered the call with an error.

    ``code`` is the wire code (``"INVALID_ARGUMENT"``, ...), ``message`` the daemon's text.

    Example::

        try:
            client.set_linked_pod("game", "alice", "lobby", 3, 0)
        except InvalidArgumentError as exc:
            print(exc.code, exc.message)
            # INVALID_ARGUMENT persist_seconds must be -1 (persistent) or 1..2147483647 seconds, got 0
    """

    wire_code: ClassVar[str] = ""

    def __init__(self, message: str, code: str | None = None) -> None:
        # One positional argument only: some subclasses are also OSErrors, which would read
        # two positional arguments as (errno, strerror).
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.wire_code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.code)


class InvalidArgumentError(ServerError):
    """INVALID_ARGUMENT: a parameter broke the contract; the message names it. Nothing was written."""

    wire_code = "INVALID_ARGUMENT"


class UnknownMethodError(ServerError):
    """UNKNOWN_METHOD: the daemon does not serve this method (an older daemon?)."""

    wire_code = "UNKNOWN_METHOD"


class UnavailableError(ServerError):
    """UNAVAILABLE: the daemon cannot reach Redis right now. Returned fast; retrying later may work."""

    wire_code = "UNAVAILABLE"


class DeadlineExceededError(ServerError, TimeoutError):
    """TIMEOUT: the request's deadline passed inside the daemon. A write may or may not have happened."""

    wire_code = "TIMEOUT"


class OverloadedError(ServerError):
    """OVERLOADED: the daemon shed load without running the request; back off and retry."""

    wire_code = "OVERLOADED"


class FailedPreconditionError(ServerError):
    """FAILED_PRECONDITION: the call cannot work with this Redis's set-up; the message says what to change."""

    wire_code = "FAILED_PRECONDITION"


class InternalServerError(ServerError):
    """INTERNAL: a bug or an unexpected Redis reply in the daemon; its log says more."""

    wire_code = "INTERNAL"


SERVER_ERRORS: dict[str, type[ServerError]] = {
    cls.wire_code: cls
    for cls in (
        InvalidArgumentError,
        UnknownMethodError,
        UnavailableError,
        DeadlineExceededError,
        OverloadedError,
        FailedPreconditionError,
        InternalServerError,
    )
}


class TransportError(StatefuldError, ConnectionError):
    """Could not talk to the daemon over its socket."""


class SocketNotFoundError(TransportError):
    """No socket file at the path: the daemon is not running here, or the path (STATEFULD_SOCKET) is wrong."""


class ConnectRefusedError(TransportError):
    """The socket file exists but nothing accepts on it: a daemon that died, or one restarting."""


class ConnectionLostError(TransportError):
    """The connection broke after the request was sent: it may or may not have been executed."""


class ClientTimeoutError(StatefuldError, TimeoutError):
    """The call's ``timeout_s`` elapsed (connecting, sending or waiting for the reply).

    The request may still run in the daemon; its late reply is discarded.
    """


class ProtocolError(StatefuldError):
    """The peer sent bytes that are not a MessagePack-RPC reply; the connection was dropped."""


class ClientClosedError(StatefuldError, RuntimeError):
    """The client was closed; a closed client cannot be reopened, make a new one."""
