"""The README's examples run as written, so they cannot rot.

Against one daemon of its own (a fresh Redis), in the README's order: every ``python`` block runs
whole, and what its print lines say they print (the comment after ``print(...)``) must be printed;
every ``sh`` block of operator commands (``.venv/bin/statefuld ...``) runs line by line, and each
line must print what its comment says. The other ``sh`` blocks install, start the daemon, run the
tests or deploy (Docker, Kubernetes, systemd): the first two are what CI runs itself.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from support import REPO, DaemonFactory, RedisServer

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
STATEFULD = ".venv/bin/statefuld "


def readme_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall((REPO / "README.md").read_text())]


def operator_lines(body: str) -> list[tuple[str, str]]:
    """(command, the output its comment promises) of each line of an operator block."""
    lines = []
    for line in body.strip().splitlines():
        command, _, expected = line.partition("#")
        lines.append((command.strip(), expected.strip()))
    return lines


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    kinds = [lang for lang, body in readme_blocks() if lang == "python" or body.startswith(STATEFULD)]
    assert kinds.count("python") >= 3 and kinds.count("sh") >= 1


def test_every_example_runs_as_written(redis_server: RedisServer, tmp_daemon: DaemonFactory) -> None:
    redis_server.client().flushall()
    daemon = tmp_daemon(redis_server.url).start()
    env = {**os.environ, "STATEFULD_SOCKET": daemon.socket_path}
    for lang, body in readme_blocks():
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=60,
                                  cwd=REPO)
            assert done.returncode == 0, f"{body}\n{done.stderr}"
            promised = [line.split("#", 1)[1].strip() for line in body.splitlines()
                        if line.strip().startswith("print(") and "#" in line]
            assert done.stdout.splitlines() == promised, body
        elif lang == "sh" and body.startswith(STATEFULD):
            for command, expected in operator_lines(body):
                argv = [sys.executable, "-m", "statefuld", *shlex.split(command)[1:]]
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, f"{command}\n{done.stderr}"
                assert done.stdout.strip() == expected, command
