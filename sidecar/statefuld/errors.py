"""Errors that travel back to the caller as ``{"code": ..., "message": ...}``."""

from __future__ import annotations

from typing import ClassVar


class RpcError(Exception):
    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidArgument(RpcError):
    code = "INVALID_ARGUMENT"


class UnknownMethod(RpcError):
    code = "UNKNOWN_METHOD"


class Unavailable(RpcError):
    """Redis cannot be reached; raised fast, never after a hang."""

    code = "UNAVAILABLE"


class DeadlineExceeded(RpcError):
    code = "TIMEOUT"


class Overloaded(RpcError):
    code = "OVERLOADED"


class Internal(RpcError):
    code = "INTERNAL"


# Process exit codes (sysexits.h), distinct so systemd and operators can tell start-up failures apart.
EXIT_OK = 0
EXIT_USAGE = 64  # bad command line or configuration
EXIT_REDIS_UNAVAILABLE = 69  # Redis not reachable (or scripts not loadable) within startup_timeout_s
EXIT_INTERNAL = 70
EXIT_SOCKET_IN_USE = 73  # a live daemon already serves on the socket path
EXIT_CONFIG = 78  # configuration refused (unsafe socket directory, unreadable password file, ...)
