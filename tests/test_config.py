"""`statefuld serve`'s options and the Config fields do not drift, and the environment reaches the daemon."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import typing
from typing import Any

import click
import pytest
from support import Daemon, RedisServer, rpc_call, running, short_tmpdir, wait_for

from statefuld.cli import serve
from statefuld.config import ENV_PREFIX, Config, option_fields


def serve_options() -> dict[str, click.Option]:
    return {p.name: p for p in serve.params if isinstance(p, click.Option) and p.name is not None}


def expected_envvar(name: str) -> str | list[str]:
    return ["STATEFULD_SOCKET", "STATEFULD_SOCKET_PATH"] if name == "socket_path" else ENV_PREFIX + name.upper()


def test_every_option_field_has_exactly_one_matching_serve_option() -> None:
    options = serve_options()
    fields = {f.name: f for f in option_fields()}
    assert set(options) == set(fields), "serve's options and Config's option fields differ"
    hints = typing.get_type_hints(Config)
    for name, f in fields.items():
        option = options[name]
        assert [p for p in serve.params if p.name == name] == [option]
        assert option.opts == ["--" + name.replace("_", "-")]
        assert option.envvar == expected_envvar(name) or option.envvar == [expected_envvar(name)]
        is_tuple = typing.get_origin(hints[name]) is tuple
        assert option.multiple is is_tuple, name
        if f.default is not dataclasses.MISSING:
            assert option.default == f.default, name
        else:  # a default_factory (computed at start-up): the option leaves it to Config
            assert option.default is None, name


def test_no_secret_is_an_option() -> None:
    secrets = [f.name for f in dataclasses.fields(Config) if f.metadata.get("secret")]
    assert secrets == ["redis_password"]
    names = set(serve_options())
    for secret in secrets:
        assert secret not in names
    assert not any("password" in n and not n.endswith("_file") for n in names)
    assert "hunter2" not in repr(Config(redis_password="hunter2"))


def test_serve_defaults_build_the_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    ctx = serve.make_context("serve", [])
    given: dict[str, Any] = {k: v for k, v in ctx.params.items() if v is not None}
    assert Config(**given) == Config()


def test_options_parse_into_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEFULD_ROUTABLE_STATE", "Ready Warm")  # multiple: whitespace-separated
    ctx = serve.make_context("serve", ["--socket-mode", "0600", "--max-in-flight", "7", "--allow-uid", "5",
                                       "--allow-uid", "6"])
    config = Config(**{k: v for k, v in ctx.params.items() if v is not None})
    assert (config.socket_mode, config.max_in_flight, config.allow_uid) == (0o600, 7, (5, 6))
    assert config.routable_state == ("Ready", "Warm")


def test_environment_reaches_the_daemon(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    env = {
        "STATEFULD_REDIS_URL": redis_server.url,  # no --redis-url: it comes from the environment
        "STATEFULD_KEY_PREFIX": "envp",
        "STATEFULD_SOCKET_MODE": "0600",
    }
    with running(Daemon(None, env=env)) as daemon:
        assert stat.S_IMODE(os.lstat(daemon.socket_path).st_mode) == 0o600
        assert rpc_call(daemon.socket_path, "set_linked_pod", ["ns", "alice", "svc", 2, -1]) == (None, None)
        assert redis_server.client().get("envp:{ns:lk:alice}svc") == "2"
        assert "embedded" not in daemon.log()


@pytest.mark.parametrize("variable", ["STATEFULD_SOCKET", "STATEFULD_SOCKET_PATH"])
def test_statefuld_socket_names_the_socket(redis_server: RedisServer, variable: str) -> None:
    directory = short_tmpdir()
    path = os.path.join(directory, "from-env.sock")
    env = {**os.environ, variable: path, "STATEFULD_REDIS_URL": redis_server.url}
    proc = subprocess.Popen([sys.executable, "-m", "statefuld", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answers() -> bool:
            try:
                return bool(rpc_call(path, "ping", [])[1] == "PONG")
            except OSError:
                return False

        wait_for(answers, timeout_s=15, what=f"daemon on ${variable}")
        # The client resolves the same variable to the same socket.
        found = subprocess.run([sys.executable, "-c", "from statefuld_client import Client; print(Client().ping())"],
                               env={**os.environ, variable: path}, capture_output=True, text=True, timeout=30)
        assert found.stdout.strip() == "PONG", found.stderr
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        os.rmdir(directory)  # empty: the socket file was removed at exit


@pytest.mark.parametrize(("variable", "meant"), [
    ("STATEFULD_REDIS_ULR", "STATEFULD_REDIS_URL"),
    ("STATEFULD_REDIS_PASWORD", "STATEFULD_REDIS_PASSWORD"),
    ("STATEFULD_MAX_INFLIGHT", "STATEFULD_MAX_IN_FLIGHT"),
])
def test_a_misspelt_variable_is_refused_before_anything_starts(variable: str, meant: str) -> None:
    directory = short_tmpdir()
    env = {**os.environ, variable: "redis://127.0.0.1:1", "STATEFULD_SOCKET": os.path.join(directory, "s.sock"),
           "STATEFULD_DATA_DIR": os.path.join(directory, "data")}
    done = subprocess.run([sys.executable, "-m", "statefuld", "serve"], env=env, capture_output=True, text=True,
                          timeout=30)
    try:
        assert done.returncode == 64
        assert done.stderr.strip() == f"statefuld: unknown environment variable {variable}; did you mean {meant}?"
        assert os.listdir(directory) == []  # no socket, no embedded Redis's data
    finally:
        os.rmdir(directory)


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--socket-mode", "999"], {}, "--socket-mode: '999' is not an octal file mode such as 0660"),
    ([], {"STATEFULD_SOCKET_MODE": "999"}, "STATEFULD_SOCKET_MODE: '999' is not an octal file mode such as 0660"),
    (["--socket-mode", "7777"], {}, "--socket-mode: '7777' is not an octal file mode such as 0660"),
    (["--socket-mode", "0000"], {}, "--socket-mode: '0000' would keep the socket's own user from connecting"),
    (["--socket-mode", "0460"], {}, "--socket-mode: '0460' would keep the socket's own user from connecting"),
])
def test_a_bad_socket_mode_is_named_where_it_came_from(argv: list[str], env: dict[str, str], expected: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STATEFULD_")}
    done = subprocess.run([sys.executable, "-m", "statefuld", "serve", *argv], env={**environ, **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 64
    assert expected in done.stderr
    other = "STATEFULD_SOCKET_MODE" if argv else "--socket-mode"
    assert other not in done.stderr.replace("Usage:", "").split("Error:")[-1]
