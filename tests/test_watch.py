"""Watches (SPEC section 2d) with real daemons, a real Redis, redis-cli and the real clients.

What users rely on: every change, whoever makes it, reaches every watcher of the service on every
daemon, in order per key, ending with the key's final value; expiries come as "expired"; anything
that may have lost events (Redis restarted, a failover, a slot moved, a watcher that does not
read) yields exactly one snapshot/gap, then live events again; watches never leave subscriptions,
memory or fds behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis
from support import (
    NS,
    SVC,
    Daemon,
    DaemonFactory,
    MessageReader,
    RawClient,
    RedisServer,
    fd_count,
    link_hash_key,
    link_key,
    rpc_call,
    rss_kib,
    states_key,
    wait_for,
)

from statefuld_client import AsyncClient, Client

STATES = states_key()
WORKLOAD = f"sf:{{{NS}:workload:{SVC}}}"


class Watcher:
    """A raw connection holding watches; collects their events as they come."""

    def __init__(self, socket_path: str) -> None:
        self.client = RawClient(socket_path, timeout_s=10)
        self.client.__enter__()
        self.events: list[tuple[int, dict[str, Any]]] = []
        self._msgid = 0
        self._stream = self.client.messages()

    def call(self, method: str, *params: Any) -> tuple[Any, Any]:
        self._msgid += 1
        self.client.request(self._msgid, method, list(params))
        for message in self._stream:
            if message[0] == 2:
                self.events.append(tuple(message[2]))  # type: ignore[arg-type]
            elif message[1] == self._msgid:
                return message[2], message[3]
        raise AssertionError("connection closed")

    def until(self, predicate: Any, timeout_s: float = 5.0) -> list[tuple[int, dict[str, Any]]]:
        """Read events until ``predicate(events)`` holds."""
        deadline = time.monotonic() + timeout_s
        self.client.sock.settimeout(timeout_s)
        while not predicate(self.events):
            assert time.monotonic() < deadline, f"timed out; events so far: {self.events[-5:]}"
            message = next(self._stream)
            assert message[0] == 2 and message[1] == "watch_event", message
            self.events.append(tuple(message[2]))  # type: ignore[arg-type]
        return self.events

    def close(self) -> None:
        self.client.__exit__(None, None, None)


@pytest.fixture
def watchers() -> Iterator[Any]:
    opened: list[Watcher] = []

    def open_watcher(socket_path: str) -> Watcher:
        watcher = Watcher(socket_path)
        opened.append(watcher)
        return watcher

    yield open_watcher
    for watcher in opened:
        watcher.close()


def redis_cli(server: RedisServer, *args: str) -> str:
    return subprocess.run(["redis-cli", "-s", server.socket_path, *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def of_kind(events: list[tuple[int, dict[str, Any]]], watch_id: int, kind: str) -> list[dict[str, Any]]:
    return [e for wid, e in events if wid == watch_id and e["kind"] == kind]


# --- events --------------------------------------------------------------------------------------


def test_changes_by_anyone_reach_every_watcher_on_every_daemon_in_order(
        tmp_daemon: DaemonFactory, start: Any, watchers: Any) -> None:
    server = start(RedisServer())
    daemons = [tmp_daemon(server.url).start() for _ in range(2)]
    pairs = []
    for daemon in daemons:
        watcher = watchers(daemon.socket_path)
        error, service = watcher.call("watch_service", NS, SVC)
        assert error is None and service["states"] == {} and service["workload"] is None
        error, links = watcher.call("watch_links", NS, SVC)
        assert error is None
        pairs.append((watcher, service["watch_id"], links["watch_id"]))

    a, b = (d.socket_path for d in daemons)
    for n in range(1, 31):  # one key changed 30 times, through both daemons and redis-cli
        if n % 3 == 0:
            redis_cli(server, "HSET", STATES, "1", f"v{n}")
        else:
            assert rpc_call(a if n % 3 == 1 else b, "set_service_state", [NS, SVC, 1, f"v{n}"]) == (None, None)
    assert rpc_call(b, "set_workload_state", [NS, SVC, "Serving"]) == (None, None)
    redis_cli(server, "HSET", STATES, "2", "Ready")
    redis_cli(server, "HDEL", STATES, "2")
    assert rpc_call(a, "set_linked_pod", [NS, "alice", SVC, 1, -1]) == (None, None)
    assert rpc_call(b, "remove_linked_pod", [NS, "alice", SVC, 60]) == (None, True)  # made temporary
    redis_cli(server, "SET", link_key("bob"), "2")
    redis_cli(server, "DEL", link_key("bob"))

    for watcher, service_id, links_id in pairs:
        def complete(events: list[tuple[int, dict[str, Any]]], s: int = service_id, li: int = links_id) -> bool:
            pods = of_kind(events, s, "pod")
            links = of_kind(events, li, "link")
            return (bool(pods) and pods[-1] == {"kind": "pod", "pod_id": 2, "state": None}
                    and any(e["pod_id"] == 1 and e["state"] == "v30" for e in pods)
                    and bool(links) and links[-1]["uid"] == "bob" and links[-1]["cause"] == "removed")

        events = watcher.until(complete)
        pod1 = [int(e["state"][1:]) for e in of_kind(events, service_id, "pod") if e["pod_id"] == 1]
        assert pod1 == sorted(pod1) and pod1[-1] == 30  # in order, fewer maybe, the final value last
        pod2 = [e["state"] for e in of_kind(events, service_id, "pod") if e["pod_id"] == 2]
        assert pod2[-1] is None
        assert of_kind(events, service_id, "workload") == [{"kind": "workload", "state": "Serving"}]
        alice = [e for e in of_kind(events, links_id, "link") if e["uid"] == "alice"]
        # Quick successive changes may come as fewer events; the last one carries the final value.
        assert alice[-1] == {"kind": "link", "uid": "alice", "pod_id": 1, "persistent": False, "cause": "set"}
        bob = [e for e in of_kind(events, links_id, "link") if e["uid"] == "bob"]
        assert bob[-1] == {"kind": "link", "uid": "bob", "pod_id": None, "persistent": None, "cause": "removed"}
        assert all(set(e) == {"kind", "uid", "pod_id", "persistent", "cause"}
                   for e in of_kind(events, links_id, "link"))


def test_a_temporary_link_left_to_expire_yields_one_expired_event(daemon: Daemon, watchers: Any,
                                                                  redis_db: redis.Redis) -> None:
    watcher = watchers(daemon.socket_path)
    assert watcher.call("watch_links", NS, SVC)[0] is None
    assert rpc_call(daemon.socket_path, "set_linked_pod", [NS, "carol", SVC, 4, 1]) == (None, None)
    ends_at = time.monotonic() + 1.0
    events = watcher.until(lambda ev: any(e.get("cause") == "expired" for _, e in ev), timeout_s=10)
    lag_s = time.monotonic() - ends_at
    carol = [e for _, e in events if e["uid"] == "carol"]
    # SET ... EX is two notifications (set, expire): the same "set" may come twice, never differing.
    assert carol[-1] == {"kind": "link", "uid": "carol", "pod_id": None, "persistent": None, "cause": "expired"}
    assert carol[:-1] and all(e == {"kind": "link", "uid": "carol", "pod_id": 4, "persistent": False,
                                    "cause": "set"} for e in carol[:-1])
    print(f"expired event {lag_s * 1000:.0f} ms after the TTL's end")


def test_a_whole_state_hash_deleted_gives_each_pod_removed(daemon: Daemon, watchers: Any,
                                                           redis_db: redis.Redis) -> None:
    redis_db.hset(STATES, mapping={"1": "Ready", "2": "Draining"})
    watcher = watchers(daemon.socket_path)
    _, service = watcher.call("watch_service", NS, SVC)
    assert service["states"] == {1: "Ready", 2: "Draining"}
    redis_db.delete(STATES)
    events = watcher.until(lambda ev: len(ev) >= 2)
    assert sorted((e["pod_id"], e["state"]) for _, e in events) == [(1, None), (2, None)]


def test_glob_characters_in_names_match_only_themselves(daemon: Daemon, watchers: Any,
                                                        redis_db: redis.Redis) -> None:
    watcher = watchers(daemon.socket_path)
    error, _ = watcher.call("watch_links", "g*", "a?[b]")
    assert error is None
    for ns, service, uid in (("gX", "a?[b]", "wrong-ns"), ("g*", "aX[b]", "wrong-service"), ("g*", "a?b", "no"),
                             ("g*", "a?[b]", "right")):
        assert rpc_call(daemon.socket_path, "set_linked_pod", [ns, uid, service, 1, -1]) == (None, None)
    events = watcher.until(lambda ev: len(ev) >= 1)
    assert [e["uid"] for _, e in events] == ["right"]


def test_unwatch_ends_the_events_and_ids_are_checked(daemon: Daemon, watchers: Any, redis_db: redis.Redis) -> None:
    watcher = watchers(daemon.socket_path)
    _, first = watcher.call("watch_service", NS, SVC)
    _, second = watcher.call("watch_service", NS, SVC)
    assert first["watch_id"] != second["watch_id"]
    assert watcher.call("unwatch", first["watch_id"]) == (None, True)
    assert watcher.call("unwatch", first["watch_id"]) == (None, False)
    assert watcher.call("unwatch", 12345) == (None, False)
    error, _ = watcher.call("unwatch", -1)
    assert error["code"] == "INVALID_ARGUMENT" and error["message"].startswith("watch_id")
    redis_db.hset(STATES, "5", "Ready")
    events = watcher.until(lambda ev: len(ev) >= 1)
    assert [wid for wid, _ in events] == [second["watch_id"]]


# --- gaps ----------------------------------------------------------------------------------------


def test_redis_restarted_gives_one_snapshot_and_one_gap_then_live_events(
        tmp_daemon: DaemonFactory, start: Any, watchers: Any) -> None:
    server = start(RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]))
    daemon = tmp_daemon(server.url).start()
    watcher = watchers(daemon.socket_path)
    _, service = watcher.call("watch_service", NS, SVC)
    _, links = watcher.call("watch_links", NS, SVC)
    r = server.client()
    r.hset(STATES, "1", "Ready")
    watcher.until(lambda ev: len(ev) >= 1)
    r.close()

    server.kill()
    server.start()
    r = server.client()
    r.config_set("notify-keyspace-events", "")  # as a restarted Redis forgets a CONFIG SET
    events = watcher.until(lambda ev: any(e["kind"] == "gap" for _, e in ev)
                           and any(e["kind"] == "snapshot" for _, e in ev), timeout_s=10)
    assert of_kind(events, service["watch_id"], "snapshot") == [
        {"kind": "snapshot", "states": {1: "Ready"}, "workload": None}]
    assert of_kind(events, links["watch_id"], "gap") == [{"kind": "gap"}]
    # The daemon set the classes again, and live events flow.
    wait_for(lambda: "K" in r.config_get("notify-keyspace-events")["notify-keyspace-events"], what="classes")
    r.hset(STATES, "1", "Draining")
    watcher.until(lambda ev: ev[-1][1] == {"kind": "pod", "pod_id": 1, "state": "Draining"})
    assert len(of_kind(watcher.events, service["watch_id"], "snapshot")) == 1
    stats = rpc_call(daemon.socket_path, "stats", [])[1]["watch"]
    assert stats["subscription_reconnects"] >= 1 and stats["gaps"]["resubscribe"] >= 2
    r.close()


def test_a_watcher_that_never_reads_costs_its_queue_bound_then_gets_one_snapshot(
        tmp_daemon: DaemonFactory, start: Any) -> None:
    server = start(RedisServer())
    daemon = tmp_daemon(server.url, args=["--watch-queue-events", "1000"]).start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    r = server.client()
    lazy = socket.socket(socket.AF_UNIX)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(daemon.socket_path)
    lazy.sendall(msgpack.packb([0, 1, "watch_service", [NS, SVC]]))
    reader = MessageReader()
    answer = next(m for m in reader.feed(lazy.recv(65536)))
    watch_id = answer[3]["watch_id"]
    base_rss = rss_kib(pid)
    latencies = []
    for start_at in range(0, 100_000, 5000):  # 100,000 changes, each an event
        with r.pipeline(transaction=False) as pipe:
            for n in range(start_at, start_at + 5000):
                pipe.hset(STATES, str(n % 500), f"s{n}")
            pipe.execute()
        began = time.monotonic()
        assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")
        latencies.append(time.monotonic() - began)
    wait_for(lambda: rpc_call(daemon.socket_path, "stats", [])[1]["watch"]["gaps"]["slow_reader"] >= 1,
             what="the slow watcher's queue dropped")
    grown = rss_kib(pid) - base_rss
    assert grown < 16 * 1024, f"RSS grew {grown} KiB"  # 1,000 queued events and socket buffers, not 100,000
    assert max(latencies) < 0.5, latencies
    r.hset(STATES, "1", "final")

    # It reads at last: what was queued, one snapshot, then live events again.
    lazy.settimeout(10)
    events: list[dict[str, Any]] = []
    while not any(e["kind"] == "snapshot" for e in events) or events[-1].get("state") != "after":
        if any(e["kind"] == "snapshot" for e in events) and not any(e.get("state") == "after" for e in events):
            r.hset(STATES, "2", "after")
        for message in reader.feed(lazy.recv(65536)):
            assert message[:2] == [2, "watch_event"] and message[2][0] == watch_id
            events.append(message[2][1])
    snapshots = [i for i, e in enumerate(events) if e["kind"] == "snapshot"]
    assert len(snapshots) == 1
    # The snapshot and the events after it, replayed, give every pod's final state.
    states = dict(events[snapshots[0]]["states"])
    for event in events[snapshots[0] + 1:]:
        states[event["pod_id"]] = event["state"]
    assert states[1] == "final" and states[2] == "after"
    lazy.close()


def test_watchers_coming_and_going_leave_no_subscription_fd_or_memory(tmp_daemon: DaemonFactory,
                                                                      start: Any) -> None:
    server = start(RedisServer())
    daemon = tmp_daemon(server.url).start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    r = server.client()

    def pubsub_counts() -> tuple[int, int]:
        clients = r.client_list()
        return sum(int(c["sub"]) for c in clients), sum(int(c["psub"]) for c in clients)

    async def churn(count: int) -> None:
        async def one(i: int) -> None:
            reader, writer = await asyncio.open_unix_connection(daemon.socket_path)
            method = "watch_links" if i % 2 else "watch_service"
            writer.write(msgpack.packb([0, 1, method, [NS, f"svc{i % 50}"]]))
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert msgpack.unpackb(data, strict_map_key=False)[2] is None
            writer.close()

        for begin in range(0, count, 200):
            await asyncio.gather(*(one(i) for i in range(begin, begin + 200)))

    asyncio.run(churn(200))  # warm up
    wait_for(lambda: pubsub_counts() == (0, 0), what="no subscription left")
    base_fds, base_rss = fd_count(pid), rss_kib(pid)

    with Client(daemon.socket_path) as client:
        watches = [client.watch_service(NS, f"svc{i}") for i in range(5)]
        assert pubsub_counts() == (10, 0)  # a state and a workload channel per service
        for watch in watches:
            watch.close()
    asyncio.run(churn(1000))
    wait_for(lambda: pubsub_counts() == (0, 0), what="no subscription left")
    wait_for(lambda: fd_count(pid) <= base_fds, what="fds back to baseline")
    assert rss_kib(pid) - base_rss < 4 * 1024
    assert rpc_call(daemon.socket_path, "stats", [])[1]["watch"]["open"] == 0


# --- Redis's set-up ---------------------------------------------------------------------------------


def test_the_daemon_adds_the_classes_it_needs_and_keeps_the_others(tmp_daemon: DaemonFactory, start: Any) -> None:
    server = start(RedisServer(extra_args=["--notify-keyspace-events", "El"]))
    daemon = tmp_daemon(server.url).start()
    # At start, before any watch: the classes it needs are added, the others kept, and it says so.
    flags = server.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set(flags) >= set("ElKg$hx")
    assert "added 'Kg$hx' to notify-keyspace-events" in daemon.log()
    with Client(daemon.socket_path) as client, client.watch_service(NS, SVC) as events:
        assert next(events)["kind"] == "snapshot"


ACL_NO_CONFIG = ["--user", "app", "on", ">pw", "~*", "&*", "+@all", "-config"]


@pytest.mark.parametrize("preset", ["", "KEA"])
def test_where_config_is_refused_a_probe_decides(preset: str, tmp_daemon: DaemonFactory, start: Any) -> None:
    server = start(RedisServer(extra_args=[*ACL_NO_CONFIG, "--notify-keyspace-events", preset]))
    url = server.url.replace("unix://", "unix://app:pw@", 1) if server.url.startswith("unix://") else server.url
    daemon = tmp_daemon(url).start()
    error, result = rpc_call(daemon.socket_path, "watch_links", [NS, SVC])
    if preset:
        assert error is None and result["watch_id"] >= 0
        return
    assert error["code"] == "FAILED_PRECONDITION"
    assert "notify-keyspace-events" in error["message"] and "Kg$hx" in error["message"]
    assert "watches may not work" in daemon.log()  # said at start already
    assert server.client().execute_command("PUBSUB", "NUMPAT") == 0  # nothing left subscribed


def test_a_user_without_the_channel_permission_is_told_which(tmp_daemon: DaemonFactory, start: Any) -> None:
    # The least ACL of docs/OPERATIONS.md ("Security") with the service watches' channels.
    server = start(RedisServer(extra_args=[
        "--notify-keyspace-events", "Kg$hx", "--user", "app", "on", ">pw", "~sf:*", "-@all", "+@read", "+@write",
        "+@scripting", "+@connection", "+time", "+@pubsub", "&__keyspace@0__:sf:*"]))
    daemon = tmp_daemon(server.url.replace("unix://", "unix://app:pw@", 1)).start()
    error, result = rpc_call(daemon.socket_path, "watch_service", [NS, SVC])
    assert error is None and result["states"] == {}
    error, _ = rpc_call(daemon.socket_path, "watch_links", [NS, SVC])
    assert error["code"] == "FAILED_PRECONDITION"
    assert "&__keyspace@0__:sf:{game:lk:*}lobby" in error["message"], error


# --- the Python client ------------------------------------------------------------------------------


def test_the_async_client_iterates_reconnects_and_never_blocks_other_calls(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url).start()

    async def scenario() -> list[dict[str, Any]]:
        client = AsyncClient(daemon.socket_path)
        seen: list[dict[str, Any]] = []
        watch = await client.watch_service(NS, SVC)
        async with watch:
            seen.append(await watch.__anext__())
            await client.set_service_state(NS, SVC, 1, "Ready")  # while nobody iterates
            assert await client.get_service_state(NS, SVC) == {1: "Ready"}
            seen.append(await watch.__anext__())
            await asyncio.to_thread(restart, daemon)
            seen.append(await asyncio.wait_for(watch.__anext__(), 10))
            await client.set_service_state(NS, SVC, 2, "Ready")
            seen.append(await asyncio.wait_for(watch.__anext__(), 10))
        await client.aclose()
        return seen

    assert asyncio.run(scenario()) == [
        {"kind": "snapshot", "states": {}, "workload": None},
        {"kind": "pod", "pod_id": 1, "state": "Ready"},
        {"kind": "snapshot", "states": {1: "Ready"}, "workload": None},  # after the restart: re-read
        {"kind": "pod", "pod_id": 2, "state": "Ready"},
    ]


def restart(daemon: Daemon) -> None:
    daemon.signal(15)
    daemon.wait()
    daemon.start()


def test_the_blocking_client_watches_links_on_its_own_connection(daemon: Daemon, redis_db: redis.Redis) -> None:
    with Client(daemon.socket_path) as client:
        with client.watch_links(NS, SVC) as events:
            client.set_linked_pod(NS, "dave", SVC, 3, -1)
            assert next(events) == {"kind": "link", "uid": "dave", "pod_id": 3, "persistent": True, "cause": "set"}
            redis_db.delete(link_key("dave"), link_hash_key("dave"))
            assert next(events)["cause"] == "removed"
        assert events.closed
        with pytest.raises(StopIteration):
            next(events)


def test_statefuld_watch_prints_one_line_per_event(daemon: Daemon, redis_db: redis.Redis) -> None:
    env = {**os.environ, "STATEFULD_SOCKET": daemon.socket_path}
    proc = subprocess.Popen([sys_executable(), "-m", "statefuld", "watch", "--json", NS, SVC], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == '{"kind": "snapshot", "states": {}, "workload": null}'
        redis_db.hset(STATES, "3", "Draining")
        assert proc.stdout.readline().strip() == '{"kind": "pod", "pod_id": 3, "state": "Draining"}'
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def sys_executable() -> str:
    import sys

    return sys.executable
