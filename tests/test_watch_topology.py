"""Watches through a Sentinel failover and a Redis Cluster slot migration (SPEC section 2d), with
real Sentinel and Cluster processes: each watch gets one snapshot/gap, then live events again."""

from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot
from support import NS, SVC, Daemon, RedisClusterProcs, RedisSentinelProcs, running, states_key

from statefuld_client import Client

STATES = states_key()


def next_event(events: Any, timeout_s: float = 20.0) -> dict[str, Any]:
    """The next event of a blocking Watch, failing the test rather than hanging it."""
    import threading

    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(next(events)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert box, f"no event within {timeout_s}s"
    return box[0]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_sentinel_failover_gives_each_watch_one_snapshot_or_gap() -> None:
    with running(RedisSentinelProcs()) as procs, running(Daemon(procs.url)) as daemon, \
            Client(daemon.socket_path, timeout_s=10) as client:
        client.set_service_state(NS, SVC, 1, "Ready")
        with client.watch_service(NS, SVC) as service, client.watch_links(NS, SVC) as links:
            assert next_event(service) == {"kind": "snapshot", "states": {1: "Ready"}, "workload": None}
            procs.primary.kill()
            assert next_event(links) == {"kind": "gap"}
            assert next_event(service)["kind"] == "snapshot"
            # Live again, on the new primary: a write after the snapshot comes as its event.
            client.set_service_state(NS, SVC, 2, "Ready")
            assert next_event(service) == {"kind": "pod", "pod_id": 2, "state": "Ready"}
            client.set_linked_pod(NS, "alice", SVC, 2, -1)
            assert next_event(links) == {"kind": "link", "uid": "alice", "pod_id": 2, "persistent": True,
                                         "cause": "set"}


@pytest.mark.slow
def test_a_cluster_slot_migration_gives_each_watch_one_snapshot_or_gap() -> None:
    with running(RedisClusterProcs()) as cluster, running(Daemon(cluster.url)) as daemon, \
            Client(daemon.socket_path, timeout_s=10) as client:
        with client.watch_service(NS, SVC) as service, client.watch_links(NS, SVC) as links:
            assert next_event(service)["kind"] == "snapshot"
            client.set_linked_pod(NS, "bob", SVC, 1, -1)
            assert next_event(links)["uid"] == "bob"

            # Move the slot of the service's state hash to another primary.
            slot = key_slot(STATES.encode())
            source = cluster.node_serving(STATES)
            target = next(n for n in cluster.primaries() if n is not source)
            src: Any = source.client()
            dst: Any = target.client()
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            for node in cluster.primaries():
                node_client: Any = node.client()
                node_client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

            assert next_event(links) == {"kind": "gap"}
            assert next_event(service)["kind"] == "snapshot"
            client.set_service_state(NS, SVC, 3, "Ready")  # served by the new owner now
            assert next_event(service) == {"kind": "pod", "pod_id": 3, "state": "Ready"}
            client.set_linked_pod(NS, "carol", SVC, 3, -1)
            assert next_event(links) == {"kind": "link", "uid": "carol", "pod_id": 3, "persistent": True,
                                         "cause": "set"}
