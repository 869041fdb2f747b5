"""The contract's names, written out from the contract itself, independently of the daemon's and
the client's own tables, and the Redis keys of the layout (docs/OPERATIONS.md) for tests to check."""

from __future__ import annotations

NS, SVC = "game", "lobby"

# The contract's methods (SPEC sections 2, 2b, 2c and 2d) and their params in wire order, written out from
# the contract itself, independently of the daemon's and the client's own tables.
CONTRACT_METHODS: dict[str, list[str]] = {
    "ping": [], "health": [],
    "set_service_state": ["ns", "service", "pod_id", "state"],
    "get_service_state": ["ns", "service"],
    "set_workload_state": ["ns", "service", "state"],
    "get_workload_state": ["ns", "service"],
    "get_workload_state_batch": ["ns", "services"],
    "set_linked_pod": ["ns", "uid", "service", "pod_id", "persist_seconds"],
    "try_set_linked_pod": ["ns", "uid", "service", "pod_id", "persist_seconds"],
    "set_linked_pod_if_absent": ["ns", "uid", "service", "pod_id", "persist_seconds"],
    "get_linked_pod": ["ns", "uid", "service"],
    "get_linked_pod_if_persist": ["ns", "uid", "service"],
    "batch_get_linked_pod": ["ns", "uids", "service"],
    "remove_linked_pod": ["ns", "uid", "service", "persist_seconds"],
    "remove_linked_pod_with_id": ["ns", "uid", "service", "persist_seconds", "pod_id"],
    "get_link_service": ["ns", "uid"],
    "report_pod_load": ["ns", "service", "pod_id", "load"],
    "compute_linked_pod": ["ns", "uid", "service", "persist_seconds"],
    "route_user": ["ns", "uid", "service", "persist_seconds"],
    "hold_pod": ["ns", "service", "pod_id", "state", "load"],
    "watch_service": ["ns", "service"],
    "watch_links": ["ns", "service"],
    "unwatch": ["watch_id"],
}




def link_key(uid: str, ns: str = NS, service: str = SVC, prefix: str = "sf") -> str:
    """The string holding ``uid``'s pod for ``service``."""
    return f"{prefix}:{{{ns}:lk:{uid}}}{service}"


def link_hash_key(uid: str, ns: str = NS, prefix: str = "sf") -> str:
    """The hash of ``uid``'s persistent links."""
    return f"{prefix}:{{{ns}:lk:{uid}}}"


def states_key(ns: str = NS, service: str = SVC, prefix: str = "sf") -> str:
    return f"{prefix}:{{{ns}:state:{service}}}"


def loads_key(ns: str = NS, service: str = SVC, prefix: str = "sf") -> str:
    return f"{prefix}:{{{ns}:state:{service}}}load"
