"""Liveness and failover (SPEC section 2c) with real daemons, real holders and a real Redis.

What users rely on: a pod whose holder dies is written Down at once and its users move to an
eligible pod exactly once; a pod whose holder is slow, or whose daemon restarts, or whose Redis
restarts, keeps its users; a pod never held keeps behaving as with the old executors.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support import (
    NS,
    SVC,
    Daemon,
    DaemonFactory,
    RedisServer,
    link_hash_key,
    link_key,
    loads_key,
    rpc_call,
    states_key,
    wait_for,
)

from statefuld_client import AsyncClient, Client, OverloadedError, StatefuldError

STATES, LOADS = states_key(NS, SVC), loads_key(NS, SVC)

# A holder in a process of its own, killed in the tests as an application crashes.
_HOLDER = """
import sys
from statefuld_client import Client
client = Client(sys.argv[1])
hold = client.hold_pod(sys.argv[2], sys.argv[3], int(sys.argv[4]), "Ready", 0)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder_process() -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def start(socket_path: str, pod_id: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, socket_path, NS, SVC, str(pod_id)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.communicate()  # waits, and closes its pipes


def report(r: redis.Redis, pod: int) -> tuple[int, int]:
    load, stamp = str(r.hget(LOADS, str(pod))).split(":")
    return int(load), int(stamp)


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def link_users(r: redis.Redis, pod: int, uids: list[str]) -> None:
    for uid in uids:
        r.set(link_key(uid), str(pod))
        r.hset(link_hash_key(uid), SVC, str(pod))


def script_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats["cmdstat_evalsha"]["calls"]) if "cmdstat_evalsha" in stats else 0


def hset_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats["cmdstat_hset"]["calls"]) if "cmdstat_hset" in stats else 0


# --- hold_pod --------------------------------------------------------------------------------------


def test_hold_pod_writes_state_and_heartbeats_until_the_last_holder_leaves(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--heartbeat-ms", "100"]).start()
    client = Client(daemon.socket_path)
    first = client.hold_pod(NS, SVC, 3, "Ready", 7)
    assert redis_db.hget(STATES, "3") == "Ready" and report(redis_db, 3)[0] == 7

    # Heartbeats refresh the report with the latest load, from the hold or from report_pod_load.
    stamp = report(redis_db, 3)[1]
    wait_for(lambda: report(redis_db, 3)[1] > stamp, timeout_s=2, what="a heartbeat")
    client.report_pod_load(NS, SVC, 3, 42)
    redis_db.hset(LOADS, "3", "0:1")  # overwritten by the next beat, with the reported load
    wait_for(lambda: report(redis_db, 3)[0] == 42, timeout_s=2, what="a heartbeat with the reported load")
    # A state written later is kept: the heartbeat writes only the load report.
    client.set_service_state(NS, SVC, 3, "Warm")
    stamp = report(redis_db, 3)[1]
    wait_for(lambda: report(redis_db, 3)[1] > stamp, timeout_s=2, what="a heartbeat")
    assert redis_db.hget(STATES, "3") == "Warm"

    # A second holder on another connection: the pod stays held while one of them does.
    second = client.hold_pod(NS, SVC, 3, "Ready", 5)
    first.close()
    stamp = report(redis_db, 3)[1]
    wait_for(lambda: report(redis_db, 3)[1] > stamp, timeout_s=2, what="a heartbeat after the first holder left")
    assert redis_db.hget(STATES, "3") == "Ready"
    assert client.call("stats")["liveness"]["held_pods"] == 1

    second.close()
    wait_for(lambda: redis_db.hget(STATES, "3") == "Down", timeout_s=2, what="Down after the last holder")
    stats = client.call("stats")["liveness"]
    assert stats["held_pods"] == 0 and stats["downs_written"] == 1 and stats["heartbeats"] >= 3
    # No more heartbeats: the report ages.
    stamp = report(redis_db, 3)[1]
    wait_for(lambda: redis_ms(redis_db) > stamp + 300, timeout_s=2, what="three heartbeat intervals")
    assert report(redis_db, 3)[1] == stamp
    client.close()


def test_a_holder_killed_moves_its_users_within_a_second(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis, holder_process: Any) -> None:
    daemon = tmp_daemon(redis_server.url).start()
    doomed = holder_process(daemon.socket_path, 1)
    holder_process(daemon.socket_path, 2)
    users = [f"u{i}" for i in range(20)]
    link_users(redis_db, 1, users)
    client = Client(daemon.socket_path)
    assert {client.route_user(NS, u, SVC, -1)["outcome"] for u in users} == {"kept"}

    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for uid in users:
        routed = client.route_user(NS, uid, SVC, -1)
        while routed["outcome"] == "kept":
            assert time.monotonic() - killed_at < 1.0, "not moved within 1 s of the holder's death"
            routed = client.route_user(NS, uid, SVC, -1)
        assert routed == {"pod_id": 2, "previous": 1, "outcome": "moved"}
    assert redis_db.hget(STATES, "1") == "Down"
    # Once per user; no new user goes to the dead pod.
    assert {client.route_user(NS, u, SVC, -1)["outcome"] for u in users} == {"kept"}
    assert {client.route_user(NS, f"new{i}", SVC, -1)["pod_id"] for i in range(20)} == {2}
    client.close()


def test_a_draining_pod_keeps_its_users_until_its_holder_exits(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis, holder_process: Any) -> None:
    daemon = tmp_daemon(redis_server.url).start()
    holder_process(daemon.socket_path, 2)
    client = Client(daemon.socket_path)
    hold = client.hold_pod(NS, SVC, 1, "Ready", 0)
    link_users(redis_db, 1, ["a", "b"])
    hold.update(state="Draining")
    assert client.route_user(NS, "a", SVC, -1) == {"pod_id": 1, "previous": 1, "outcome": "kept"}
    assert {client.route_user(NS, f"new{i}", SVC, -1)["pod_id"] for i in range(10)} == {2}
    hold.close()  # the application exits once drained
    wait_for(lambda: redis_db.hget(STATES, "1") == "Down", timeout_s=2, what="Down")
    assert client.route_user(NS, "b", SVC, -1) == {"pod_id": 2, "previous": 1, "outcome": "moved"}
    client.close()


def test_a_late_report_younger_than_the_gone_bound_keeps_users_also_while_redis_pauses(
        tmp_daemon: DaemonFactory, start: Any, holder_process: Any) -> None:
    own = start(RedisServer())
    r = own.client()
    daemon = tmp_daemon(own.url, args=["--heartbeat-ms", "100", "--load-stale-ms", "300",
                                       "--gone-after-ms", "5000"]).start()
    holder_process(daemon.socket_path, 1)
    holder_process(daemon.socket_path, 2)
    link_users(r, 1, ["a"])
    # A paused holder's report: older than the staleness bound, younger than the gone bound.
    r.hset(STATES, "3", "Ready")
    r.hset(LOADS, "3", f"0:{redis_ms(r) - 1000}")
    link_users(r, 3, ["c"])
    client = Client(daemon.socket_path, timeout_s=10)
    assert client.route_user(NS, "c", SVC, -1)["outcome"] == "kept"

    # Redis paused for 2 s: heartbeats wait, nothing flaps afterwards.
    beats_before = script_calls(r)
    with own.paused():
        paused_at = time.monotonic()
        wait_for(lambda: time.monotonic() - paused_at >= 2.0, what="two seconds of pause")
    # At most one heartbeat per held pod was waiting for Redis (20 intervals passed): they never
    # pile up. (Counted at once after the pause; a beat or two more may have started since.)
    assert script_calls(r) - beats_before <= 6
    assert client.route_user(NS, "a", SVC, -1) == {"pod_id": 1, "previous": 1, "outcome": "kept"}
    assert r.hget(STATES, "1") == "Ready"
    stamp = report(r, 1)[1]
    wait_for(lambda: report(r, 1)[1] > stamp, timeout_s=2, what="heartbeats after the pause")
    assert client.call("stats")["liveness"]["downs_written"] == 0
    client.close()


def test_a_daemon_restart_writes_no_down_and_the_client_holds_again_within_a_heartbeat(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url).start()
    client = Client(daemon.socket_path)
    hold = client.hold_pod(NS, SVC, 1, "Ready", 3)
    link_users(redis_db, 1, ["a"])
    hsets = hset_calls(redis_db)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert redis_db.hget(STATES, "1") == "Ready"
    stamp = report(redis_db, 1)[1]
    daemon.start()
    ready_at = time.monotonic()
    wait_for(lambda: report(redis_db, 1)[1] > stamp, timeout_s=2, what="the hold taken again")
    assert time.monotonic() - ready_at < 1.0  # within one --heartbeat-ms (1000) of the new daemon being ready
    # The re-hold's two (state and report, in hold_pod.lua), and no other: no Down was ever written.
    assert hset_calls(redis_db) == hsets + 2
    assert client.route_user(NS, "a", SVC, -1)["outcome"] == "kept"
    # The new daemon holds it: its heartbeats run, its stats count it.
    assert client.call("stats")["liveness"]["held_pods"] == 1
    hold.update(load=9)
    assert report(redis_db, 1)[0] == 9
    hold.close()
    client.close()


def test_redis_restarted_under_held_pods_moves_nobody(tmp_daemon: DaemonFactory, start: Any,
                                                      holder_process: Any) -> None:
    own = start(RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]))
    r = own.client()
    daemon = tmp_daemon(own.url, args=["--heartbeat-ms", "100"]).start()
    holder_process(daemon.socket_path, 1)
    holder_process(daemon.socket_path, 2)
    link_users(r, 1, ["a"])
    r.close()

    own.kill()
    own.start()
    r = own.client()
    stamp = report(r, 1)[1]
    wait_for(lambda: report(r, 1)[1] > stamp, timeout_s=5, what="heartbeats after the restart")
    client = Client(daemon.socket_path)
    assert r.hget(STATES, "1") == "Ready" and r.hget(STATES, "2") == "Ready"
    assert client.route_user(NS, "a", SVC, -1) == {"pod_id": 1, "previous": 1, "outcome": "kept"}
    assert client.call("stats")["liveness"]["downs_written"] == 0
    client.close()
    r.close()


def test_a_forked_child_does_not_inherit_the_hold(tmp_daemon: DaemonFactory, redis_server: RedisServer,
                                                  redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--heartbeat-ms", "100"]).start()

    async def scenario() -> None:
        client = AsyncClient(daemon.socket_path)
        async with client.hold_pod(NS, SVC, 1, "Ready", 0) as hold:
            pid = os.fork()
            if pid == 0:  # the child: the hold is not its own, and its exit releases nothing
                code = 0
                try:
                    await hold.update(load=5)
                    code = 1
                except StatefuldError:
                    pass
                os._exit(code)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            stamp = report(redis_db, 1)[1]
            await asyncio.to_thread(wait_for, lambda: report(redis_db, 1)[1] > stamp, 2, 0.02, "a heartbeat")
            assert redis_db.hget(STATES, "1") == "Ready"
        await asyncio.to_thread(wait_for, lambda: redis_db.hget(STATES, "1") == "Down", 2, 0.02, "Down")
        await client.aclose()

    asyncio.run(scenario())


def test_a_forked_child_does_not_inherit_a_blocking_hold(tmp_daemon: DaemonFactory, redis_server: RedisServer,
                                                         redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--heartbeat-ms", "100"]).start()
    with Client(daemon.socket_path) as client:
        hold = client.hold_pod(NS, SVC, 2, "Ready", 0)
        pid = os.fork()
        if pid == 0:  # the child: the thread that holds is the parent's; nothing here releases it
            code = 1
            try:
                hold.update(load=5)
            except StatefuldError:
                hold.close()
                code = 0
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        stamp = report(redis_db, 2)[1]
        wait_for(lambda: report(redis_db, 2)[1] > stamp, timeout_s=2, what="a heartbeat after the child left")
        assert redis_db.hget(STATES, "2") == "Ready" and report(redis_db, 2)[0] == 0
        hold.close()
    wait_for(lambda: redis_db.hget(STATES, "2") == "Down", timeout_s=2, what="Down once the parent releases it")


def test_held_pods_are_bounded(tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--max-held-pods", "2"]).start()
    client = Client(daemon.socket_path)
    holds = [client.hold_pod(NS, SVC, pod, "Ready", 0) for pod in (1, 2)]
    with pytest.raises(OverloadedError, match="--max-held-pods"):
        client.hold_pod(NS, SVC, 3, "Ready", 0)
    assert not redis_db.hexists(STATES, "3")
    holds[0].close()
    wait_for(lambda: client.call("stats")["liveness"]["held_pods"] == 1, timeout_s=2, what="the hold released")
    holds.append(client.hold_pod(NS, SVC, 3, "Ready", 0))
    for hold in holds:
        hold.close()
    client.close()


def test_a_connection_closed_for_a_malformed_message_loses_its_hold(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    import socket

    import msgpack

    daemon = tmp_daemon(redis_server.url).start()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(daemon.socket_path)
        sock.sendall(msgpack.packb([0, 1, "hold_pod", [NS, SVC, 4, "Ready", 0]]))
        assert msgpack.unpackb(sock.recv(1024)) == [1, 1, None, None]
        sock.sendall(b"\xc1")  # never valid MessagePack: the daemon closes this connection
        wait_for(lambda: redis_db.hget(STATES, "4") == "Down", timeout_s=2, what="Down")


@pytest.mark.parametrize(("args", "message"), [
    (["--gone-after-ms", "10000"], "gone_after_ms (10000) must be above load_stale_ms (10000)"),
    (["--heartbeat-ms", "10000"], "heartbeat_ms (10000) must be below load_stale_ms (10000)"),
    (["--gone-state", "Ready"], "state 'Ready' is both a routable_state and a gone_state"),
])
def test_inconsistent_liveness_options_are_refused_at_start(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "statefuld", "serve", "--redis-url", "redis://127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 64
    assert message in done.stderr


# --- failover at scale -----------------------------------------------------------------------------


def test_a_thousand_users_of_a_gone_pod_routed_through_two_daemons_move_exactly_once(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemons = [tmp_daemon(redis_server.url).start() for _ in range(2)]
    targets = range(2, 6)
    for pod in targets:
        redis_db.hset(STATES, str(pod), "Ready")
        redis_db.hset(LOADS, str(pod), f"0:{redis_ms(redis_db)}")
    redis_db.hset(STATES, "1", "Down")
    users = [f"u{i}" for i in range(1000)]
    link_users(redis_db, 1, users)

    async def callers(socket_path: str, seed: int) -> list[tuple[str, dict[str, Any]]]:
        client = AsyncClient(socket_path)
        answers: list[tuple[str, dict[str, Any]]] = []

        async def caller(n: int) -> None:
            order = users * 3  # every user asked several times by each daemon
            random.Random(seed * 100 + n).shuffle(order)
            for uid in order[: len(order) // 32]:
                answers.append((uid, await client.route_user(NS, uid, SVC, -1)))

        await asyncio.gather(*(caller(n) for n in range(32)))
        await client.aclose()
        return answers

    async def both() -> list[tuple[str, dict[str, Any]]]:
        results = await asyncio.gather(*(callers(d.socket_path, i) for i, d in enumerate(daemons)))
        return results[0] + results[1]

    answers = asyncio.run(asyncio.wait_for(both(), 120))
    # Every user once more, so that each has been asked at least once.
    with Client(daemons[0].socket_path) as client:
        answers += [(uid, client.route_user(NS, uid, SVC, -1)) for uid in users]

    by_user: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for uid, routed in answers:
        by_user[uid].append(routed)
    received: collections.Counter[int] = collections.Counter()
    for uid in users:
        routed = by_user[uid]
        assert len({r["pod_id"] for r in routed}) == 1, routed
        assert [r["outcome"] for r in routed].count("moved") == 1, routed
        pod = routed[0]["pod_id"]
        assert pod in targets and redis_db.get(link_key(uid)) == str(pod)
        assert redis_db.hgetall(link_hash_key(uid)) == {SVC: str(pod)}
        received[pod] += 1
    # Each move counted its user into its pod; a pick whose move lost the race still counted one
    # (the documented slack): at most one per answer that was not the move.
    lost_races = sum(1 for _, r in answers if r["outcome"] == "kept")
    loads = {pod: report(redis_db, pod)[0] for pod in targets}
    for pod in targets:
        assert loads[pod] >= received[pod]
    assert sum(loads.values()) - sum(received.values()) <= lost_races


# --- operators ---------------------------------------------------------------------------------------


def test_describe_pods_says_why(daemon: Daemon, redis_db: redis.Redis) -> None:
    now = redis_ms(redis_db)
    redis_db.hset(STATES, mapping={"1": "Ready", "2": "Draining", "3": "Down", "4": "Ready", "6": "Ready"})
    redis_db.hset(LOADS, mapping={"1": f"5:{now}", "2": f"0:{now}", "4": f"1:{now - 40_000}",
                                  "5": f"0:{now}", "6": f"2:{now - 15_000}"})
    error, pods = rpc_call(daemon.socket_path, "describe_pods", [NS, SVC])
    assert error is None
    by_id = {p["pod_id"]: p for p in pods}
    assert [p["pod_id"] for p in pods] == [1, 2, 3, 4, 5, 6]
    assert (by_id[1]["status"], by_id[1]["load"], by_id[1]["state"]) == ("eligible", 5, "Ready")
    assert 0 <= by_id[1]["report_age_ms"] < 5000
    assert by_id[2]["status"] == "alive" and "not routable" in by_id[2]["why"]
    assert by_id[3]["status"] == "gone" and by_id[3]["load"] is None
    assert by_id[4]["status"] == "gone" and "--gone-after-ms" in by_id[4]["why"]
    assert by_id[5]["status"] == "gone" and by_id[5]["state"] is None
    assert by_id[6]["status"] == "alive" and "--load-stale-ms" in by_id[6]["why"]


def test_a_pod_made_gone_by_another_writer_is_seen_within_the_alive_cache(
        tmp_daemon: DaemonFactory, redis_server: RedisServer, redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--alive-cache-ms", "300"]).start()
    redis_db.hset(STATES, mapping={"1": "Ready", "2": "Ready"})
    redis_db.hset(LOADS, mapping={"1": f"0:{redis_ms(redis_db)}", "2": f"0:{redis_ms(redis_db)}"})
    link_users(redis_db, 1, ["a"])
    client = Client(daemon.socket_path)
    assert client.route_user(NS, "a", SVC, -1)["outcome"] == "kept"
    redis_db.hset(STATES, "1", "Down")  # another daemon, or an operator
    gone_at = time.monotonic()
    # Judged alive less than --alive-cache-ms ago: still taken as alive.
    assert client.route_user(NS, "a", SVC, -1)["outcome"] == "kept"
    wait_for(lambda: client.route_user(NS, "a", SVC, -1)["outcome"] == "moved", timeout_s=2, what="the move")
    assert time.monotonic() - gone_at < 1.0
    client.close()


def test_route_outcomes_are_counted(tmp_daemon: DaemonFactory, redis_server: RedisServer,
                                    redis_db: redis.Redis) -> None:
    daemon = tmp_daemon(redis_server.url, args=["--alive-cache-ms", "0"]).start()
    before = rpc_call(daemon.socket_path, "stats", [])[1]["liveness"]["routes"]
    redis_db.hset(STATES, "1", "Ready")
    redis_db.hset(LOADS, "1", f"0:{redis_ms(redis_db)}")
    for uid in ("a", "a", "b"):
        rpc_call(daemon.socket_path, "route_user", [NS, uid, SVC, -1])
    redis_db.hset(STATES, "1", "Down")
    rpc_call(daemon.socket_path, "route_user", [NS, "a", SVC, -1])
    after = rpc_call(daemon.socket_path, "stats", [])[1]["liveness"]["routes"]
    assert {k: after[k] - before[k] for k in after} == {"placed": 2, "kept": 1, "moved": 0, "none": 1}
