"""The daemon's methods, typed, for the blocking client.

GENERATED from _async_api.py by client_py/scripts/unasync.py: do not edit, edit the source and rerun.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from statefuld_client._core import READ_METHODS, as_list, linked_pair


class SyncAPI:
    """The daemon's methods (docs/PROTOCOL.md); a shell supplies `_call` and `_notify`."""

    __slots__ = ()

    def _call(self, method: str, params: list[Any], timeout_s: float | None, is_read: bool) -> Any:
        raise NotImplementedError

    def _notify(self, method: str, params: list[Any], timeout_s: float | None) -> None:
        raise NotImplementedError

    def call(self, method: str, *params: Any, timeout_s: float | None = None) -> Any:
        """Call any daemon method by name; return its decoded result as is.

        Example: ``client.call("get_linked_pod", "game", "alice", "lobby")`` -> ``3``
        """
        return self._call(method, list(params), timeout_s, method in READ_METHODS)

    def notify(self, method: str, *params: Any, timeout_s: float | None = None) -> None:
        """Send a method as a notification: executed by the daemon, never answered.

        Returns once the request is handed to the connection; failures are only in the daemon's
        log and metrics. ``timeout_s`` bounds connecting and sending.
        """
        self._notify(method, list(params), timeout_s)

    def ping(self, *, timeout_s: float | None = None) -> str:
        """Check that the daemon answers (Redis is not consulted).

        Example: ``client.ping()`` -> ``"PONG"``
        """
        return cast(str, self._call("ping", [], timeout_s, True))

    def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The daemon's health: at least ``ready`` (bool: Redis reachable, scripts loaded) and ``redis``.

        Example: ``client.health()`` -> ``{"ready": True, "redis": "ok"}``
        (when Redis cannot be reached: ``{"ready": False, "redis": "unreachable: ..."}``)
        """
        return cast("dict[str, Any]", self._call("health", [], timeout_s, True))

    # -- pod and workload states --------------------------------------------------------------

    def set_service_state(self, ns: str, service: str, pod_id: int, state: str, *,
                                timeout_s: float | None = None) -> None:
        """Publish the state of one pod of a service.

        Example: ``client.set_service_state("game", "lobby", 3, "Ready")``
        """
        self._call("set_service_state", [ns, service, pod_id, state], timeout_s, False)

    def notify_service_state(self, ns: str, service: str, pod_id: int, state: str, *,
                                   timeout_s: float | None = None) -> None:
        """`set_service_state` as a fire-and-forget notification, for heartbeats: no reply, no error.

        Example: ``client.notify_service_state("game", "lobby", 3, "Ready")``
        """
        self._notify("set_service_state", [ns, service, pod_id, state], timeout_s)

    def get_service_state(self, ns: str, service: str, *,
                                timeout_s: float | None = None) -> dict[int, str]:
        """The state of every pod of a service, pod id -> state; ``{}`` if none.

        Example: ``client.get_service_state("game", "lobby")`` -> ``{3: "Ready"}``
        """
        return cast("dict[int, str]", self._call("get_service_state", [ns, service], timeout_s, True))

    def set_workload_state(self, ns: str, service: str, state: str, *,
                                 timeout_s: float | None = None) -> None:
        """Publish the state of the whole service (its workload).

        Example: ``client.set_workload_state("game", "lobby", "Running")``
        """
        self._call("set_workload_state", [ns, service, state], timeout_s, False)

    def get_workload_state(self, ns: str, service: str, *,
                                 timeout_s: float | None = None) -> str | None:
        """The workload state of a service, or None.

        Example: ``client.get_workload_state("game", "lobby")`` -> ``"Running"``
        """
        return cast("str | None", self._call("get_workload_state", [ns, service], timeout_s, True))

    def get_workload_state_batch(self, ns: str, services: Iterable[str], *,
                                       timeout_s: float | None = None) -> dict[str, str]:
        """Workload states of many services, service -> state, only for those that have one.

        Example: ``client.get_workload_state_batch("game", ["lobby", "match"])`` -> ``{"lobby": "Running"}``
        """
        params = [ns, as_list(services)]
        return cast("dict[str, str]", self._call("get_workload_state_batch", params, timeout_s, True))

    # -- user -> pod links ----------------------------------------------------------------------

    def set_linked_pod(self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int, *,
                             timeout_s: float | None = None) -> int | None:
        """Link the user to ``pod_id``, overwriting any link; return the pod linked before, or None.

        ``persist_seconds``: -1 makes the link persistent, N > 0 temporary (expires after N seconds).

        Example: ``client.set_linked_pod("game", "alice", "lobby", 3, -1)`` -> ``None``
        """
        params = [ns, uid, service, pod_id, persist_seconds]
        return cast("int | None", self._call("set_linked_pod", params, timeout_s, False))

    def try_set_linked_pod(self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int, *,
                                 timeout_s: float | None = None) -> tuple[bool, int]:
        """Link as `set_linked_pod` does, unless the user has a persistent link to another pod.

        Returns ``(True, pod_id)`` when linked, ``(False, current_pod)`` when left unchanged.

        Example: ``client.try_set_linked_pod("game", "alice", "lobby", 4, -1)`` -> ``(False, 3)``
        """
        params = [ns, uid, service, pod_id, persist_seconds]
        return linked_pair(self._call("try_set_linked_pod", params, timeout_s, False))

    def set_linked_pod_if_absent(self, ns: str, uid: str, service: str, pod_id: int, persist_seconds: int,
                                       *, timeout_s: float | None = None) -> int:
        """Link the user to ``pod_id`` only if no link exists; return the pod linked after the call.

        Example: ``client.set_linked_pod_if_absent("game", "alice", "lobby", 4, 60)`` -> ``3``
        """
        params = [ns, uid, service, pod_id, persist_seconds]
        return cast(int, self._call("set_linked_pod_if_absent", params, timeout_s, False))

    def get_linked_pod(self, ns: str, uid: str, service: str, *,
                             timeout_s: float | None = None) -> int | None:
        """The pod the user is linked to for the service (persistent or temporary), or None.

        Example: ``client.get_linked_pod("game", "alice", "lobby")`` -> ``3``
        """
        return cast("int | None", self._call("get_linked_pod", [ns, uid, service], timeout_s, True))

    def get_linked_pod_if_persist(self, ns: str, uid: str, service: str, *,
                                        timeout_s: float | None = None) -> int | None:
        """The pod the user is linked to if that link is persistent, else None.

        Example: ``client.get_linked_pod_if_persist("game", "alice", "lobby")`` -> ``3``
        """
        params = [ns, uid, service]
        return cast("int | None", self._call("get_linked_pod_if_persist", params, timeout_s, True))

    def batch_get_linked_pod(self, ns: str, uids: Iterable[str], service: str, *,
                                   timeout_s: float | None = None) -> dict[int, list[str]]:
        """Group users by the pod they are linked to: pod id -> uids (input order); unlinked uids left out.

        Example: ``client.batch_get_linked_pod("game", ["alice", "bob", "eve"], "lobby")``
        -> ``{3: ["alice", "eve"]}``
        """
        params = [ns, as_list(uids), service]
        return cast("dict[int, list[str]]", self._call("batch_get_linked_pod", params, timeout_s, True))

    def remove_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int, *,
                                timeout_s: float | None = None) -> bool:
        """Remove the user's link; True if one existed.

        ``persist_seconds``: -1 deletes it now; N > 0 keeps it N more seconds as a temporary link, so a
        user who comes back in that window returns to the same pod.

        Example: ``client.remove_linked_pod("game", "alice", "lobby", -1)`` -> ``True``
        """
        params = [ns, uid, service, persist_seconds]
        return cast(bool, self._call("remove_linked_pod", params, timeout_s, False))

    def remove_linked_pod_with_id(self, ns: str, uid: str, service: str, persist_seconds: int, pod_id: int,
                                        *, timeout_s: float | None = None) -> bool:
        """Remove the user's link only if it points at ``pod_id``; True if it did (and was removed).

        Example: ``client.remove_linked_pod_with_id("game", "alice", "lobby", -1, 3)`` -> ``True``
        """
        params = [ns, uid, service, persist_seconds, pod_id]
        return cast(bool, self._call("remove_linked_pod_with_id", params, timeout_s, False))

    def get_link_service(self, ns: str, uid: str, *, timeout_s: float | None = None) -> dict[str, int]:
        """The user's persistent links, service -> pod id.

        Example: ``client.get_link_service("game", "alice")`` -> ``{"lobby": 3}``
        """
        return cast("dict[str, int]", self._call("get_link_service", [ns, uid], timeout_s, True))

    # -- placement --------------------------------------------------------------------------------------

    def report_pod_load(self, ns: str, service: str, pod_id: int, load: int, *,
                              timeout_s: float | None = None) -> None:
        """Report a pod's load (an int >= 0, lower is better) for `compute_linked_pod`.

        Example: ``client.report_pod_load("game", "lobby", 3, 120)``
        """
        self._call("report_pod_load", [ns, service, pod_id, load], timeout_s, False)

    def notify_pod_load(self, ns: str, service: str, pod_id: int, load: int, *,
                              timeout_s: float | None = None) -> None:
        """`report_pod_load` as a fire-and-forget notification, for periodic reports: no reply, no error.

        Example: ``client.notify_pod_load("game", "lobby", 3, 120)``
        """
        self._notify("report_pod_load", [ns, service, pod_id, load], timeout_s)

    def compute_linked_pod(self, ns: str, uid: str, service: str, persist_seconds: int, *,
                                 timeout_s: float | None = None) -> int | None:
        """The user's pod: `route_user`'s ``pod_id`` alone.

        Keeps a link to an alive pod unchanged, places a new user on a lightly loaded ready pod,
        moves a user whose pod is gone; None if no pod is eligible.

        Example: ``client.compute_linked_pod("game", "alice", "lobby", -1)`` -> ``3``
        """
        params = [ns, uid, service, persist_seconds]
        return cast("int | None", self._call("compute_linked_pod", params, timeout_s, False))

    # -- liveness and failover --------------------------------------------------------------------------

    def route_user(self, ns: str, uid: str, service: str, persist_seconds: int, *,
                         timeout_s: float | None = None) -> dict[str, Any]:
        """Route a user: keep them on an alive pod, place a new user, move one whose pod is gone.

        Returns ``{"pod_id": int | None, "previous": int | None, "outcome": str}``, outcome one of
        ``"kept"``, ``"placed"``, ``"moved"``, ``"none"`` (no eligible pod). Of concurrent callers
        for one user, on any daemons, all get the same pod and at most one gets ``"moved"`` or
        ``"placed"``: that caller alone should restore the user's state on the new pod.

        Example: ``client.route_user("game", "alice", "lobby", -1)``
        -> ``{"pod_id": 4, "previous": 3, "outcome": "moved"}``
        """
        params = [ns, uid, service, persist_seconds]
        return cast("dict[str, Any]", self._call("route_user", params, timeout_s, False))

    def describe_pods(self, ns: str, service: str, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Every pod of a service as `route_user` judges it now, for operators.

        Each item: ``pod_id``, ``state`` (None: no state), ``load`` and ``report_age_ms`` (None: no
        load report), ``status`` (``"eligible"``, ``"alive"`` or ``"gone"``) and ``why``.

        Example: ``client.describe_pods("game", "lobby")``
        -> ``[{"pod_id": 3, "state": "Ready", "load": 12, "report_age_ms": 420, "status": "eligible", ...}]``
        """
        return cast("list[dict[str, Any]]", self._call("describe_pods", [ns, service], timeout_s, True))
