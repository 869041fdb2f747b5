"""TLS to Redis (rediss://) against a real TLS-only redis-server, with certificates made here by openssl.

The server listens on a TLS port only (`--port 0`), so a daemon that serves spoke TLS. Checked: the
server is verified against --redis-tls-ca-file (another CA's certificate, or one for another host
name, is refused at start-up), and a client certificate is presented when Redis demands one. A TLS
file that is missing, unreadable or not usable is a configuration error (exit 78, one line naming
the file), and TLS files given with a URL that is not rediss:// are warned about, not silently
ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon, DaemonFactory, RedisServer, free_port, rpc_call, running, short_tmpdir
from support.tls import make_ca, make_cert

EXIT_REDIS_UNAVAILABLE = 69
EXIT_CONFIG = 78
PASSWORD = "tls-s3cret"
NS, SVC = "tls", "lobby"


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    d = Path(short_tmpdir("sft-"))
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "wrong-host", "ca", "DNS:redis.example.invalid")
    make_cert(d, "client", "ca", "DNS:statefuld")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def tls_redis(certs: Path, *, server_cert: str = "server", auth_clients: bool = False) -> RedisServer:
    server = RedisServer(extra_args=[
        "--tls-port", str(free_port()),
        "--tls-cert-file", str(certs / f"{server_cert}.crt"),
        "--tls-key-file", str(certs / f"{server_cert}.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "yes" if auth_clients else "no",
    ])
    return server


def tls_url(server: RedisServer) -> str:
    port = server.extra_args[server.extra_args.index("--tls-port") + 1]
    return f"rediss://127.0.0.1:{port}"


def serves(daemon: Daemon, server: RedisServer) -> None:
    assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "alice", SVC, 4, -1]) == (None, None)
    assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, "alice", SVC]) == (None, 4)
    assert server.client().get(f"sf:{{{NS}:lk:alice}}{SVC}") == "4"


def fails_to_start(daemon: Daemon) -> str:
    daemon.args += ["--startup-timeout-s", "0.5"]
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_REDIS_UNAVAILABLE
    assert not os.path.exists(daemon.socket_path)
    return daemon.log()


def test_tls_with_the_servers_ca(certs: Path) -> None:
    with running(tls_redis(certs)) as server:
        daemon = Daemon(tls_url(server), args=["--redis-tls-ca-file", str(certs / "ca.crt")])
        with running(daemon):
            serves(daemon, server)
            assert "rediss://127.0.0.1" in daemon.log()
            assert "tls_files_ignored" not in daemon.log()  # the warning is for plain URLs only


def test_a_server_certificate_from_another_ca_is_refused(certs: Path, tmp_daemon: DaemonFactory) -> None:
    with running(tls_redis(certs)) as server:
        daemon = tmp_daemon(tls_url(server), args=["--redis-tls-ca-file", str(certs / "other-ca.crt")])
        log = fails_to_start(daemon)
        assert "certificate verify failed" in log


def test_a_server_certificate_for_another_host_is_refused(certs: Path, tmp_daemon: DaemonFactory) -> None:
    with running(tls_redis(certs, server_cert="wrong-host")) as server:
        daemon = tmp_daemon(tls_url(server), args=["--redis-tls-ca-file", str(certs / "ca.crt")])
        log = fails_to_start(daemon)
        assert "certificate is not valid for '127.0.0.1'" in log


def test_client_certificate_when_redis_demands_one(certs: Path, tmp_daemon: DaemonFactory) -> None:
    ca = ["--redis-tls-ca-file", str(certs / "ca.crt")]
    with running(tls_redis(certs, auth_clients=True)) as server:
        without = tmp_daemon(tls_url(server), args=list(ca))
        assert "certificate required" in fails_to_start(without)
        daemon = Daemon(tls_url(server), args=[
            *ca, "--redis-tls-cert-file", str(certs / "client.crt"), "--redis-tls-key-file", str(certs / "client.key"),
        ])
        with running(daemon):
            serves(daemon, server)


def client_tls_args(certs: Path, **replace: str) -> list[str]:
    files = {"ca": certs / "ca.crt", "cert": certs / "client.crt", "key": certs / "client.key"}
    files.update({name: certs / value for name, value in replace.items()})
    return ["--redis-tls-ca-file", str(files["ca"]), "--redis-tls-cert-file", str(files["cert"]),
            "--redis-tls-key-file", str(files["key"])]


@pytest.mark.parametrize(("replace", "expected"), [
    ({"ca": "missing-ca.crt"}, "cannot read --redis-tls-ca-file {certs}/missing-ca.crt: No such file or directory"),
    ({"cert": "missing.crt"}, "cannot read --redis-tls-cert-file {certs}/missing.crt: No such file or directory"),
    ({"key": "missing.key"}, "cannot read --redis-tls-key-file {certs}/missing.key: No such file or directory"),
    ({"ca": "."}, "cannot read --redis-tls-ca-file {certs}: Is a directory"),  # unreadable, even for root
    ({"ca": "client.key"}, "cannot use --redis-tls-ca-file {certs}/client.key: [X509: NO_CERTIFICATE_OR_CRL_FOUND]"),
    ({"key": "server.key"}, "cannot use --redis-tls-cert-file {certs}/client.crt with --redis-tls-key-file "
                            "{certs}/server.key: [X509: KEY_VALUES_MISMATCH]"),
])
def test_an_unusable_tls_file_is_a_configuration_error(certs: Path, replace: dict[str, str], expected: str,
                                                       tmp_daemon: DaemonFactory) -> None:
    # Before: redis-py's FileNotFoundError/SSLError escaped start-up as exit 70 with a traceback,
    # which systemd restarts forever. No Redis is needed: the files are checked before connecting.
    daemon = tmp_daemon(f"rediss://:{PASSWORD}@127.0.0.1:{free_port()}",
                    args=[*client_tls_args(certs, **replace), "--startup-timeout-s", "0.5"])
    daemon.start(wait=False)
    assert daemon.wait(15) == EXIT_CONFIG, daemon.log()
    log = daemon.log()
    assert f"statefuld cannot start: {expected.format(certs=certs)}" in log
    assert "Traceback" not in log and PASSWORD not in log
    assert not os.path.exists(daemon.socket_path)


def test_tls_files_with_a_plain_url_are_warned_about(certs: Path) -> None:
    # redis-py ignores TLS settings for redis://: an operator who meant rediss:// would otherwise
    # send the password and every user id in clear with nothing in the log to say so.
    with running(RedisServer(port=free_port())) as server:
        daemon = Daemon(server.tcp_url, args=["--redis-tls-ca-file", str(certs / "ca.crt")])
        with running(daemon):
            serves(daemon, server)
            assert f"ignoring --redis-tls-ca-file {certs / 'ca.crt'}: redis://127.0.0.1:{server.port} is not " \
                   "reached over TLS" in daemon.log()
