"""Where the daemon's socket is. The daemon and the client share this one rule."""

from __future__ import annotations

import os

SOCKET_ENV = "STATEFULD_SOCKET"
# Read in this order, the first set one wins; the daemon reads the same two.
SOCKET_ENVS = (SOCKET_ENV, "STATEFULD_SOCKET_PATH")
SYSTEM_SOCKET_DIR = "/run/statefuld"
SOCKET_NAME = "statefuld.sock"


def default_socket_path() -> str:
    """Return the socket path from ``STATEFULD_SOCKET`` (or ``STATEFULD_SOCKET_PATH``), else the default.

    The default is ``/run/statefuld/statefuld.sock`` for root and whenever
    ``/run/statefuld`` exists (a system install made it, so every user of the
    host finds the one daemon); otherwise a per-user path:
    ``$XDG_RUNTIME_DIR/statefuld/statefuld.sock``, or
    ``/tmp/statefuld-<uid>/statefuld.sock`` without ``XDG_RUNTIME_DIR``.
    """
    for name in SOCKET_ENVS:
        explicit = os.environ.get(name)
        if explicit:
            return explicit
    if os.geteuid() == 0 or os.path.isdir(SYSTEM_SOCKET_DIR):
        return os.path.join(SYSTEM_SOCKET_DIR, SOCKET_NAME)
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "statefuld", SOCKET_NAME)
    return os.path.join("/tmp", f"statefuld-{os.geteuid()}", SOCKET_NAME)
