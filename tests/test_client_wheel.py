"""The client as a user gets it: its wheel in a fresh venv, with msgpack as the only dependency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, Daemon

ALLOWED = {"pip", "setuptools", "msgpack", "statefuld-client"}

SCRIPT = """
import asyncio, sys
from statefuld_client import AsyncClient, Client, InvalidArgumentError

with Client(sys.argv[1]) as client:
    assert client.ping() == "PONG"
    assert client.set_linked_pod("wheel", "alice", "lobby", 3, -1) is None
    assert client.get_linked_pod("wheel", "alice", "lobby") == 3
    try:
        client.get_linked_pod("wheel", "", "lobby")
    except InvalidArgumentError as exc:
        assert "uid" in exc.message
    else:
        raise AssertionError("an empty uid was accepted")

async def main():
    async with AsyncClient(sys.argv[1]) as client:
        assert await client.try_set_linked_pod("wheel", "alice", "lobby", 4, -1) == (False, 3)

asyncio.run(main())
print("ok")
"""


def run(*args: str | Path, timeout_s: float = 120) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_client_wheel_installs_alone_and_calls_the_daemon(tmp_path: Path, daemon: Daemon) -> None:
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
        "-w", wheels, REPO / "client_py")
    (wheel,) = wheels.glob("statefuld_client-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)

    installed = {p["name"].lower() for p in json.loads(run(python, "-m", "pip", "list", "--format=json"))}
    assert {"msgpack", "statefuld-client"} <= installed <= ALLOWED, installed

    # Run from tmp_path so that the repository's own client_py cannot be imported by accident.
    result = subprocess.run([str(python), "-c", SCRIPT, daemon.socket_path], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
