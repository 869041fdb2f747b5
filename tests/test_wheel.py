"""The daemon as it is installed: its wheel carries the Lua scripts, and the installed executor
finds and runs them with the repository out of reach."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis
from support import REPO, RedisServer

SCRIPT = """
import asyncio, sys
import statefuld
from statefuld.config import Config
from statefuld.executor import Executor
from statefuld.scripts import scripts_dir

# Found inside the installed package, not in a checkout.
assert str(scripts_dir()).startswith(str(__import__("pathlib").Path(statefuld.__file__).parent)), scripts_dir()

async def main():
    ex = await Executor.connect(Config(redis_url=sys.argv[1], startup_timeout_s=10))
    try:
        assert await ex.set_linked_pod("wheel", "alice", "lobby", 3, -1) is None
        assert await ex.try_set_linked_pod("wheel", "alice", "lobby", 4, -1) == (False, 3)
        await ex.set_service_state("wheel", "lobby", 5, "Ready")
        await ex.report_pod_load("wheel", "lobby", 5, 0)
        assert await ex.compute_linked_pod("wheel", "bob", "lobby", -1) == 5
    finally:
        await ex.close()

asyncio.run(main())
print("ok")
"""

KNOWN_SCRIPTS = {"set_linked_pod", "try_set_linked_pod", "set_linked_pod_if_absent", "get_linked_pod_if_persist",
                "remove_linked_pod", "remove_linked_pod_with_id", "pick_pod", "report_pod_load"}


def run(*args: str | Path, timeout_s: float = 240) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sidecar_wheel_ships_the_scripts_and_runs_them(tmp_path: Path, redis_server: RedisServer,
                                                       redis_db: redis.Redis) -> None:
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
        "-w", wheels, REPO / "client_py", REPO / "sidecar")
    (sidecar,) = wheels.glob("statefuld-*.whl")
    (client,) = wheels.glob("statefuld_client-*.whl")

    with zipfile.ZipFile(sidecar) as wheel:
        shipped = {Path(name).stem: wheel.read(name) for name in wheel.namelist()
                   if name.startswith("statefuld/lua_scripts/") and name.endswith(".lua")}
    # Every script of the repository (the contract's known ones at least), byte for byte, so the
    # SHAs match the other executors'.
    in_repo = {path.stem: path.read_bytes() for path in (REPO / "lua_scripts").glob("*.lua")}
    assert KNOWN_SCRIPTS <= set(in_repo)
    assert shipped == in_repo

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", client, sidecar)

    # From tmp_path, so that neither the repository nor its lua_scripts/ can be picked up.
    result = subprocess.run([str(python), "-c", SCRIPT, redis_server.url], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert redis_db.get("sf:{wheel:lk:alice}lobby") == "3"
    assert redis_db.get("sf:{wheel:lk:bob}lobby") == "5"
