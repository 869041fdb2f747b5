"""What the tests share: real processes (processes), the raw MessagePack-RPC client (wire), the
contract's names and Redis keys (keys), coroutines on the daemon's loop (aio), certificates (tls).
The fixtures that start and always stop these live in tests/conftest.py."""

from support.aio import ExecutorRun, run_async
from support.keys import CONTRACT_METHODS, NS, SVC, link_hash_key, link_key, loads_key, states_key
from support.processes import (
    NOBODY,
    REPO,
    ClusterInspector,
    Daemon,
    DaemonFactory,
    RedisClusterProcs,
    RedisSentinelProcs,
    RedisServer,
    TlsFiles,
    as_root,
    call_as,
    fd_count,
    free_port,
    reachable_by_others,
    redis_server_binary,
    rss_kib,
    running,
    short_tmpdir,
    wait_for,
)
from support.wire import MessageReader, RawClient, in_flight, rpc_call

__all__ = [
    "CONTRACT_METHODS",
    "NOBODY",
    "NS",
    "REPO",
    "SVC",
    "ClusterInspector",
    "Daemon",
    "DaemonFactory",
    "ExecutorRun",
    "MessageReader",
    "RawClient",
    "RedisClusterProcs",
    "RedisSentinelProcs",
    "RedisServer",
    "TlsFiles",
    "as_root",
    "call_as",
    "fd_count",
    "free_port",
    "in_flight",
    "link_hash_key",
    "link_key",
    "loads_key",
    "reachable_by_others",
    "redis_server_binary",
    "rpc_call",
    "rss_kib",
    "run_async",
    "running",
    "short_tmpdir",
    "states_key",
    "wait_for",
]
