"""The errors a call can end with, each code defined once, and the process exit codes.

An ``RpcError`` travels back to the caller as ``{"code": ..., "message": ...}``; any other
exception that reaches calls.py is a bug, answered INTERNAL and logged with its traceback.
"""

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


class FailedPrecondition(RpcError):
    """The call cannot work with this Redis's set-up; the message says what to change."""

    code = "FAILED_PRECONDITION"


class Internal(RpcError):
    code = "INTERNAL"


# Every code a call can end with, "OK" first: the metrics count calls by these.
CODES = ("OK", *(cls.code for cls in (InvalidArgument, UnknownMethod, Unavailable, DeadlineExceeded, Overloaded,
                                     FailedPrecondition, Internal)))

# Process exit codes (sysexits.h), distinct so systemd and operators can tell start-up failures apart.
EXIT_OK = 0
EXIT_USAGE = 64  # bad command line or configuration
EXIT_REDIS_UNAVAILABLE = 69  # Redis not reachable (or scripts not loadable) within startup_timeout_s
EXIT_INTERNAL = 70
EXIT_SOCKET_IN_USE = 73  # a live daemon already serves on the socket path
EXIT_CONFIG = 78  # configuration refused (unsafe socket directory, unreadable password file, ...)
