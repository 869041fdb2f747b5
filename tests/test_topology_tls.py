"""TLS in the other two modes: a Redis Cluster and a Sentinel set whose nodes (and sentinels) listen
on TLS ports only, with replication, the cluster bus and the sentinels' own links over TLS too.

The daemon is given a rediss:// (rediss+sentinel://) URL and the CA alone, as in production; it
must detect the mode, reach every node the topology names with the seed's TLS settings, and
serve. The certificates (tests/test_tls.py's openssl helpers) name 127.0.0.1 by IP: cluster nodes
are reached at the addresses CLUSTER SLOTS announces, and those are what the server name check
sees (docs/OPERATIONS.md, "Security").
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon, RedisClusterProcs, RedisSentinelProcs, TlsFiles, rpc_call, running, short_tmpdir
from support.tls import make_ca, make_cert

NS, SVC = "tls", "lobby"


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    d = Path(short_tmpdir("sftt-"))
    try:
        make_ca(d, "ca")
        make_cert(d, "node", "ca", "IP:127.0.0.1,DNS:localhost")
        (d / "node.key").chmod(0o600)
        yield TlsFiles(ca=str(d / "ca.crt"), cert=str(d / "node.crt"), key=str(d / "node.key"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def link(uid: str) -> str:
    return f"sf:{{{NS}:lk:{uid}}}{SVC}"


def serves_users(daemon: Daemon, uids: list[str]) -> None:
    for pod, uid in enumerate(uids):
        assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, uid, SVC, pod, -1]) == (None, None)
    for pod, uid in enumerate(uids):
        assert rpc_call(daemon.socket_path, "get_linked_pod", [NS, uid, SVC]) == (None, pod)
    _, grouped = rpc_call(daemon.socket_path, "batch_get_linked_pod", [NS, uids, SVC])
    assert grouped == {pod: [uid] for pod, uid in enumerate(uids)}


def test_a_tls_only_cluster_is_detected_and_served(tls_files: TlsFiles) -> None:
    with running(RedisClusterProcs(tls=tls_files)) as procs:
        assert procs.url.startswith("rediss://127.0.0.1:")
        uids = [f"user-{i}" for i in range(30)]
        with procs.client() as c:
            ports = {c.get_node_from_key(link(uid)).port for uid in uids}
        assert len(ports) == 3  # the users are spread over every primary
        daemon = Daemon(procs.url, args=["--redis-tls-ca-file", tls_files.ca])
        with running(daemon):
            serves_users(daemon, uids)
            log = daemon.log()
        assert "Redis Cluster via rediss://127.0.0.1" in log
        with procs.client() as c:
            assert [c.get(link(uid)) for uid in uids] == [str(pod) for pod in range(len(uids))]


def test_a_tls_only_sentinel_set_is_followed_and_served(tls_files: TlsFiles) -> None:
    with running(RedisSentinelProcs(tls=tls_files)) as procs:
        assert procs.url.startswith("rediss+sentinel://127.0.0.1:")
        daemon = Daemon(procs.url, args=["--redis-tls-ca-file", tls_files.ca])
        with running(daemon):
            serves_users(daemon, ["alice", "bob"])
            log = daemon.log()
        assert f"primary: 127.0.0.1:{procs.primary.port}" in log
        assert procs.primary.client().get(link("bob")) == "1"
