"""The Lua scripts: found inside the package, loaded once (SCRIPT LOAD), run by SHA.

Each file is loaded exactly as it is, nothing prepended: the SHA Redis computes is the sha1 of
the file, so the Go and Java executors, ``redis-cli --eval`` and the benchmark's direct path
run the very same script by the very same SHA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from statefuld.redis_mux import Decode, Recover, ReplyError


class ScriptTransport(Protocol):
    def execute(self, route_key: str, *args: Any, decode: Decode | None = None,
                recover: Recover | None = None) -> Awaitable[Any]: ...


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


def scripts_dir() -> Path:
    """lua_scripts/ inside the installed wheel, else (editable install) the repository's."""
    packaged = resources.files("statefuld") / "lua_scripts"
    if packaged.is_dir():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parents[2] / "lua_scripts"
    if repo.is_dir():
        return repo
    raise FileNotFoundError("the Lua scripts are missing: neither statefuld/lua_scripts nor ../lua_scripts exist")


def load_scripts(directory: Path | None = None) -> dict[str, Script]:
    directory = directory or scripts_dir()
    scripts: dict[str, Script] = {}
    for path in sorted(directory.glob("*.lua")):
        # The bytes as they are (no newline translation), so the SHA is the file's own.
        body = path.read_bytes()
        scripts[path.stem] = Script(path.stem, body.decode("utf-8"), hashlib.sha1(body).hexdigest())
    return scripts


class Scripts:
    """Runs scripts by SHA; on NOSCRIPT (Redis restarted or flushed, a failover to a replica
    that never saw SCRIPT LOAD) it runs it once more by EVAL with its source, which caches it again."""

    def __init__(self, scripts: dict[str, Script]) -> None:
        self._scripts = scripts
        self.reloads = 0

    def __getitem__(self, name: str) -> Script:
        return self._scripts[name]

    def all(self) -> list[Script]:
        return list(self._scripts.values())

    def run(self, transport: ScriptTransport, name: str, keys: Sequence[str], args: Sequence[Any],
            decode: Decode | None = None) -> Awaitable[Any]:
        """The script's reply, decoded by ``decode``, as the transport's own future: a call of one
        script needs no coroutine, and the retry after NOSCRIPT takes over that same future."""
        script = self._scripts[name]

        def recover(error: ReplyError) -> Awaitable[Any] | None:
            if error.kind != "NOSCRIPT":
                return None
            self.reloads += 1
            # EVAL with the source, not SCRIPT LOAD then EVALSHA: a SCRIPT FLUSH between those two
            # would fail the request; EVAL runs the script and caches it again in one command.
            return transport.execute(keys[0], "EVAL", script.source, len(keys), *keys, *args, decode=decode)

        return transport.execute(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args, decode=decode,
                                 recover=recover)
