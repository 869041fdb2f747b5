"""Other languages' msgpack-rpc clients, the real libraries, against a real daemon: Node's
msgpack-rpc-lite (tests/interop/node_client.js) and Go's net/rpc with the ugorji msgpack-rpc codec
(tests/interop/go_client.go). scripts/test installs both (npm, and Debian's golang-go and
golang-github-ugorji-go-codec-dev)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from support import REPO, Daemon, RedisServer, short_tmpdir

INTEROP = REPO / "tests" / "interop"


@pytest.fixture(scope="module")
def go_client() -> Iterator[str]:
    """The Go program, built against Debian's packaged codec (GOPATH mode, no module download)."""
    work = short_tmpdir("sfgo-")
    binary = os.path.join(work, "go_client")
    env = {**os.environ, "GOPATH": "/usr/share/gocode", "GO111MODULE": "off", "GOCACHE": os.path.join(work, "cache")}
    try:
        built = subprocess.run(["go", "build", "-o", binary, str(INTEROP / "go_client.go")], env=env,
                               capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr
        yield binary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_node_msgpack_rpc_lite(daemon: Daemon, redis_server: RedisServer) -> None:
    done = subprocess.run(["node", str(INTEROP / "node_client.js"), daemon.socket_path], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["ping"] == "PONG" and seen["set"] is None
    assert seen["states"] == {"3": "Ready"}  # a JavaScript object: the integer pod id became a string key
    # msgids from 2^31 up, which the library writes as float64: answered, connection kept.
    assert seen["big_msgid"] == {"error": None, "result": "PONG"}
    assert seen["top_msgid"] == {"error": None, "result": "PONG"}
    assert seen["error"] == {"code": "INVALID_ARGUMENT",
                             "message": "uid must not contain '{', '}' or control characters"}


def test_go_net_rpc_with_the_ugorji_codec(daemon: Daemon, redis_server: RedisServer, go_client: str) -> None:
    done = subprocess.run([go_client, daemon.socket_path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "set_error_format: <nil>",
        "ping: PONG <nil>",  # no arguments: the codec sends nil params
        "set_linked_pod: <nil> <nil>",
        "get_linked_pod: 5 <nil>",
        # net/rpc decodes an error only as a string: set_error_format("string") made it one.
        "error: INVALID_ARGUMENT: uid must not contain '{', '}' or control characters",
        "ping again: PONG <nil>",
    ]
