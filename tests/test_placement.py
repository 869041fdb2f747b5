"""Placement (SPEC section 2b) against a real Redis: report_pod_load and compute_linked_pod.

What callers rely on: an existing link always wins and is left exactly as it is; a new user goes
only to a routable pod with a fresh load report, or gets nil with nothing written; new users
spread by load; racing calls for one user agree on one pod and leave one link.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis
from support import Daemon, DaemonFactory, ExecutorRun, MessageReader, RawClient, RedisServer, rpc_call, wait_for

from statefuld.executor import Executor
from statefuld.scripts import scripts_dir

NS, SVC = "game", "lobby"
STATES = "sf:{game:state:lobby}"
LOADS = "sf:{game:state:lobby}load"
WRITES = ("cmdstat_set", "cmdstat_hset", "cmdstat_hdel", "cmdstat_del", "cmdstat_expire", "cmdstat_hincrby")


def link(uid: str) -> str:
    return f"sf:{{game:lk:{uid}}}{SVC}"


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def seed_pods(r: redis.Redis, states: dict[int | str, str], loads: dict[int | str, int], age_ms: int = 0) -> None:
    """Pods in the layout of section 2b, written with plain commands; load reports age_ms old."""
    if states:
        r.hset(STATES, mapping={str(pod): state for pod, state in states.items()})
    stamp = redis_ms(r) - age_ms
    if loads:
        r.hset(LOADS, mapping={str(pod): f"{load}:{stamp}" for pod, load in loads.items()})


def loads_of(r: redis.Redis, pods: Any = None) -> dict[str, tuple[int, int]]:
    """pod -> (load, unix ms) of the reports (of ``pods`` only, if given)."""
    raw: dict[str, str] = r.hgetall(LOADS)  # type: ignore[assignment]
    return {pod: (int(v.split(":")[0]), int(v.split(":")[1])) for pod, v in raw.items() if pods is None or pod in pods}


def wait_until_reports_are_older_than(r: redis.Redis, age_ms: int) -> None:
    """Until Redis's clock, which judges staleness, is ``age_ms`` past every load report."""
    newest = max(stamp for _, stamp in loads_of(r).values())
    wait_for(lambda: redis_ms(r) - newest >= age_ms, timeout_s=5, what=f"the reports {age_ms} ms old")


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key with its type, content and TTL."""
    result: dict[str, Any] = {}
    for key in map(str, r.keys("*")):
        kind = r.type(key)
        content = r.hgetall(key) if kind == "hash" else r.get(key)
        result[key] = (kind, content, r.ttl(key))
    return result


def write_counts(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {name: int(stats[name]["calls"]) if name in stats else 0 for name in WRITES}


# --- report_pod_load -----------------------------------------------------------------------------


def test_report_pod_load_writes_load_and_redis_time(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    async def body(ex: Executor) -> None:
        await ex.report_pod_load(NS, SVC, 3, 17)
        await ex.report_pod_load(NS, SVC, 2147483647, 0)

    before = redis_ms(redis_db)
    with_executor(body)
    after = redis_ms(redis_db)
    assert {str(k): str(v) for k, v in ((k, redis_db.type(k)) for k in redis_db.keys("*"))} == {LOADS: "hash"}
    assert redis_db.ttl(LOADS) == -1
    loads = loads_of(redis_db)
    assert set(loads) == {"3", "2147483647"}
    assert loads["3"][0] == 17 and loads["2147483647"][0] == 0
    assert all(before <= stamp <= after for _, stamp in loads.values())

    # A new report replaces the load and refreshes the stamp.
    wait_for(lambda: redis_ms(redis_db) > loads["3"][1], what="Redis's clock to pass the report's millisecond")
    with_executor(lambda ex: ex.report_pod_load(NS, SVC, 3, 5))
    load, stamp = loads_of(redis_db)["3"]
    assert load == 5 and stamp > loads["3"][1]


# --- compute_linked_pod ----------------------------------------------------------------------------


def test_a_link_to_an_alive_pod_is_returned_untouched(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    # Eligible pods exist, but the users' links point at alive pods that are not even routable.
    seed_pods(redis_db, {1: "Ready", 2: "Draining", 9: "Starting"}, {1: 0, 2: 0})
    redis_db.set(link("temp"), "9", ex=100)  # pod 9 never reported a load: alive while its state is
    redis_db.set(link("pers"), "2")
    redis_db.hset("sf:{game:lk:pers}", SVC, "2")
    before = snapshot(redis_db)

    async def body(ex: Executor) -> Any:
        # persist_seconds is unused for an existing link: neither made persistent nor given a TTL.
        return await ex.compute_linked_pod(NS, "temp", SVC, -1), await ex.compute_linked_pod(NS, "pers", SVC, 60)

    assert with_executor(body) == (9, 2)
    assert 99_000 < redis_db.pttl(link("temp")) <= 100_000  # no TTL reset
    assert snapshot(redis_db) == before  # loads included: nobody was counted in


def test_only_routable_pods_with_fresh_reports_are_chosen(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Ready", 10: "Ready", 3: "Draining", 4: "Ready", 6: "ready", "abc": "Ready",
                         "07x": "Ready"}, {1: 40, 10: 40, 3: 0, 6: 0, "abc": 0, "07x": 0, 8: 0})
    seed_pods(redis_db, {2: "Ready"}, {2: 0}, age_ms=20_000)  # stale: older than the default 10 s
    seed_pods(redis_db, {2147483648: "Ready", 10**20: "Ready"}, {2147483648: 0, 10**20: 0})  # not pod ids
    redis_db.hset(STATES, "5", "Ready")
    redis_db.hset(LOADS, "5", "low:now")  # a report that is not "<load>:<ms>"
    # 4 has no report, 8 has no state, 6's state differs in case.
    raw_before, loads_before = redis_db.hgetall(LOADS), loads_of(redis_db, ("1", "10"))

    async def body(ex: Executor) -> list[int | None]:
        return [await ex.compute_linked_pod(NS, f"u{i}", SVC, -1) for i in range(200)]

    picked = with_executor(body)
    counts: collections.Counter[int | None] = collections.Counter(picked)
    assert set(counts) == {1, 10}
    # Both eligible pods are used: two choices, the lower load wins.
    assert min(counts.values()) > 50
    loads = loads_of(redis_db, ("1", "10"))
    for pod in ("1", "10"):
        # Each new user is counted into its pod; the pod's own report time is kept.
        assert loads[pod] == (loads_before[pod][0] + counts[int(pod)], loads_before[pod][1])
    raw_after = redis_db.hgetall(LOADS)
    assert {p: v for p, v in raw_after.items() if p not in loads} == {
        p: v for p, v in raw_before.items() if p not in loads}
    # Each user got a persistent link in the shared layout.
    assert redis_db.get(link("u0")) == str(picked[0]) and redis_db.ttl(link("u0")) == -1
    assert redis_db.hgetall("sf:{game:lk:u0}") == {SVC: str(picked[0])}


def test_a_temporary_pick_links_like_set_linked_pod_if_absent(with_executor: ExecutorRun,
                                                              redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {4: "Ready"}, {4: 0})
    assert with_executor(lambda ex: ex.compute_linked_pod(NS, "alice", SVC, 30)) == 4
    assert redis_db.get(link("alice")) == "4"
    assert 29_000 < redis_db.pttl(link("alice")) <= 30_000
    assert not redis_db.exists("sf:{game:lk:alice}")


@pytest.mark.parametrize("case", ["no pods", "none routable", "all stale", "no reports"])
def test_no_eligible_pod_gives_nil_and_writes_nothing(case: str, with_executor: ExecutorRun,
                                                      redis_db: redis.Redis) -> None:
    if case == "none routable":
        seed_pods(redis_db, {1: "Draining", 2: "Starting"}, {1: 0, 2: 0})
    elif case == "all stale":
        seed_pods(redis_db, {1: "Ready", 2: "Ready"}, {1: 0, 2: 0}, age_ms=10_500)
    elif case == "no reports":
        seed_pods(redis_db, {1: "Ready", 2: "Ready"}, {})
    before, writes = snapshot(redis_db), write_counts(redis_db)

    assert with_executor(lambda ex: ex.compute_linked_pod(NS, "alice", SVC, -1)) is None
    assert snapshot(redis_db) == before
    assert write_counts(redis_db) == writes


def test_a_report_goes_stale_after_the_bound(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    redis_db.hset(STATES, "1", "Ready")

    async def body(ex: Executor) -> Any:
        await ex.report_pod_load(NS, SVC, 1, 0)
        fresh = await ex.compute_linked_pod(NS, "early", SVC, -1)
        await asyncio.to_thread(wait_until_reports_are_older_than, redis_db, 300)
        stale = await ex.compute_linked_pod(NS, "late", SVC, -1)
        await ex.report_pod_load(NS, SVC, 1, 0)  # the pod's next report makes it eligible again
        return fresh, stale, await ex.compute_linked_pod(NS, "late", SVC, -1)

    assert with_executor(body, load_stale_ms=300, heartbeat_ms=100) == (1, None, 1)


# pick_pod.lua's own text run inside a wrapper that writes pod 1's report ARGV[1] ms before
# Redis' clock, then reads the clock again: when the millisecond did not change meanwhile, the
# pick saw a report exactly that old. Otherwise it answers "retry".
_AT_AGE = """
local function ms() local t = redis.call('TIME'); return t[1] * 1000 + math.floor(t[2] / 1000) end
local before = ms()
redis.call('HSET', KEYS[2], '1', '0:' .. (before - tonumber(ARGV[1])))
local function pick(KEYS, ARGV)
%s
end
local picked = pick(KEYS, {'', unpack(ARGV, 2)})
if ms() ~= before then return 'retry' end
return picked or 'none'
"""


@pytest.mark.parametrize(("age_ms", "expected"), [(999, "1"), (1000, "none")])
def test_a_report_must_be_fresher_than_the_bound(age_ms: int, expected: str, redis_db: redis.Redis) -> None:
    # SPEC 2b: "fresher than" the staleness bound; a report exactly as old as the bound is stale.
    wrapper = _AT_AGE % (scripts_dir() / "pick_pod.lua").read_text()
    redis_db.hset(STATES, "1", "Ready")
    for _ in range(100):  # a millisecond tick during the script is rare; retried, never judged
        reply = redis_db.eval(wrapper, 2, STATES, LOADS, age_ms, 1000, 30_000, 0.5, 0.5, 1, "Ready", "Down")
        if reply != "retry":
            break
    assert reply == expected


def _spread(with_executor: ExecutorRun, loads: dict[int, int], users: int) -> collections.Counter[int | None]:
    async def body(ex: Executor) -> collections.Counter[int | None]:
        for pod, load in loads.items():
            await ex.set_service_state(NS, SVC, pod, "Ready")
            await ex.report_pod_load(NS, SVC, pod, load)
        picked: list[int | None] = []
        for start in range(0, users, 500):  # 500 in flight at a time, as many callers would be
            picked += await asyncio.gather(*(ex.compute_linked_pod(NS, f"u{i}", SVC, -1)
                                             for i in range(start, start + 500)))
        return collections.Counter(picked)

    # A stale bound far above the test's run time: the reports must not age out halfway.
    result: collections.Counter[int | None] = with_executor(body, load_stale_ms=600_000, gone_after_ms=1_200_000)
    return result


def test_new_users_spread_evenly_over_pods_of_equal_load(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    counts = _spread(with_executor, {pod: 0 for pod in range(8)}, 10_000)
    assert set(counts) == set(range(8))
    assert max(counts.values()) <= 1.5 * min(counts.values()), counts
    # The loads count exactly the users linked to each pod, and there is one link per user.
    assert {int(p): load for p, (load, _) in loads_of(redis_db).items()} == dict(counts)
    assert len(redis_db.keys("sf:{game:lk:*}" + SVC)) == 10_000


def test_a_pod_reporting_a_much_higher_load_gets_clearly_fewer(with_executor: ExecutorRun) -> None:
    counts = _spread(with_executor, {0: 1000, **{pod: 0 for pod in range(1, 8)}}, 10_000)
    others = [counts[pod] for pod in range(1, 8)]
    assert None not in counts
    # The others first catch up with pod 0's 1000 (7000 users), then all share the rest.
    assert counts[0] < min(others) / 2, counts
    assert max(others) <= 1.5 * min(others), counts


def test_two_random_choices_not_always_the_least_loaded(with_executor: ExecutorRun) -> None:
    # Pod 0 is far below the others for the whole run (its load reaches about 250 of their 1000+).
    # Always-least-loaded would give it every user; power of two choices gives it exactly the
    # picks where it is one of the two pods drawn: 1 - C(7,2)/C(8,2) = 1/4 of them (a uniform
    # random pick would give 1/8). Binomial(1000, 1/4) falls outside 180..330 with probability
    # below 1e-7; Binomial(1000, 1/8) inside it with probability below 1e-6.
    counts = _spread(with_executor, {0: 0, **{pod: 1000 for pod in range(1, 8)}}, 1000)
    assert None not in counts
    assert 180 <= counts[0] <= 330, counts
    # The others share the rest, balanced by the same two choices (at least 36 each in 20,000
    # simulated runs; about 107 on average).
    assert min(counts[pod] for pod in range(1, 8)) >= 10, counts


# --- over the wire, through the daemon --------------------------------------------------------------


async def _call_on_separate_connections(socket_path: str, method: str, params: list[Any], n: int) -> list[Any]:
    """n calls, each on its own connection, all connected before any is sent, answered in any order."""
    connections = [await asyncio.open_unix_connection(socket_path) for _ in range(n)]
    try:
        request = msgpack.packb([0, 1, method, params])
        for _, writer in connections:
            writer.write(request)

        async def answer(reader: asyncio.StreamReader) -> Any:
            messages = MessageReader()
            while True:
                data = await reader.read(65536)
                assert data, "the daemon closed the connection"
                for message in messages.feed(data):
                    assert message[:3] == [1, 1, None], message
                    return message[3]

        return await asyncio.gather(*(answer(reader) for reader, _ in connections))
    finally:
        for _, writer in connections:
            writer.close()


def test_200_racing_calls_for_one_new_user_agree_and_leave_one_link(daemon: Daemon, redis_db: redis.Redis) -> None:
    for pod in range(8):
        assert rpc_call(daemon.socket_path, "set_service_state", [NS, SVC, pod, "Ready"]) == (None, None)
        assert rpc_call(daemon.socket_path, "report_pod_load", [NS, SVC, pod, 0]) == (None, None)

    results = asyncio.run(asyncio.wait_for(
        _call_on_separate_connections(daemon.socket_path, "compute_linked_pod", [NS, "alice", SVC, -1], 200), 30))

    assert len(set(results)) == 1 and results[0] in range(8)
    linked = str(results[0])
    assert sorted(redis_db.keys("sf:{game:lk:*")) == ["sf:{game:lk:alice}", link("alice")]
    assert redis_db.get(link("alice")) == linked and redis_db.ttl(link("alice")) == -1
    assert redis_db.hgetall("sf:{game:lk:alice}") == {SVC: linked}
    # The winner counted the user into the pod it linked (losers' counts last until the next report).
    assert loads_of(redis_db)[linked][0] >= 1


def test_report_pod_load_as_a_notification(daemon: Daemon, redis_db: redis.Redis) -> None:
    redis_db.hset(STATES, "5", "Ready")
    with RawClient(daemon.socket_path) as client:
        client.send([2, "report_pod_load", [NS, SVC, 5, 12]],
                    [2, "report_pod_load", [NS, SVC, 6, -1]],  # invalid: logged, no reply
                    [0, 7, "ping", []])
        assert next(client.messages()) == [1, 7, None, "PONG"]  # nothing answers the notifications
        assert client.nothing_more(0.2)
    wait_for(lambda: redis_db.hexists(LOADS, "5"), timeout_s=5, what="the notified load report")
    assert loads_of(redis_db)["5"][0] == 12
    assert list(redis_db.hkeys(LOADS)) == ["5"]
    assert rpc_call(daemon.socket_path, "compute_linked_pod", [NS, "alice", SVC, -1]) == (None, 5)


WITH_OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "options": lambda: {"args": ["--routable-state", "Ready", "--routable-state", "Warm", "--load-stale-ms", "400",
                                 "--heartbeat-ms", "100"]},
    "environment": lambda: {"env": {"STATEFULD_ROUTABLE_STATE": "Ready Warm", "STATEFULD_LOAD_STALE_MS": "400",
                                    "STATEFULD_HEARTBEAT_MS": "100"}},
}


@pytest.mark.parametrize("how", sorted(WITH_OPTIONS))
def test_routable_states_and_staleness_are_configurable(how: str, redis_server: RedisServer,
                                                        redis_db: redis.Redis, tmp_daemon: DaemonFactory) -> None:
    daemon = tmp_daemon(redis_server.url, **WITH_OPTIONS[how]()).start()
    for pod, state in ((1, "Ready"), (2, "Warm"), (3, "Draining")):
        assert rpc_call(daemon.socket_path, "set_service_state", [NS, SVC, pod, state]) == (None, None)
        assert rpc_call(daemon.socket_path, "report_pod_load", [NS, SVC, pod, 0]) == (None, None)
    picked = [rpc_call(daemon.socket_path, "compute_linked_pod", [NS, f"u{i}", SVC, -1]) for i in range(40)]
    assert {error for error, _ in picked} == {None}
    # Both configured states are routable (the default is Ready alone); Draining never is.
    assert {pod for _, pod in picked} == {1, 2}
    # 400 ms without a report and no pod is eligible (the default bound is 10 s).
    wait_until_reports_are_older_than(redis_db, 400)
    assert rpc_call(daemon.socket_path, "compute_linked_pod", [NS, "late", SVC, -1]) == (None, None)
    assert not redis_db.exists(link("late"))


# --- route_user (SPEC section 2c) -------------------------------------------------------------------


def route(with_executor: ExecutorRun, uid: str, persist_seconds: int = -1, **config: Any) -> dict[str, Any]:
    result: dict[str, Any] = with_executor(lambda ex: ex.route_user(NS, uid, SVC, persist_seconds), **config)
    return result


def test_route_user_places_keeps_and_moves(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Ready"}, {1: 0})
    assert route(with_executor, "alice") == {"pod_id": 1, "previous": None, "outcome": "placed"}
    assert route(with_executor, "alice") == {"pod_id": 1, "previous": 1, "outcome": "kept"}

    # Pod 1 goes Down, pod 2 is ready: alice moves, once; the move is persistent as asked.
    seed_pods(redis_db, {1: "Down", 2: "Ready"}, {2: 0})
    loads_before = loads_of(redis_db, ("2",))
    assert route(with_executor, "alice", 60) == {"pod_id": 2, "previous": 1, "outcome": "moved"}
    assert redis_db.get(link("alice")) == "2" and 59 <= redis_db.ttl(link("alice")) <= 60
    assert not redis_db.exists("sf:{game:lk:alice}")
    assert loads_of(redis_db, ("2",))["2"][0] == loads_before["2"][0] + 1
    assert route(with_executor, "alice") == {"pod_id": 2, "previous": 2, "outcome": "kept"}


@pytest.mark.parametrize("gone", ["no state", "gone state", "old report"])
def test_a_user_of_a_gone_pod_moves(gone: str, with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {2: "Ready"}, {2: 0})
    if gone == "gone state":
        seed_pods(redis_db, {1: "Down"}, {1: 0})
    elif gone == "old report":
        seed_pods(redis_db, {1: "Ready"}, {1: 0}, age_ms=2_000)  # --gone-after-ms 2000 below
    redis_db.set(link("bob"), "1")
    redis_db.hset("sf:{game:lk:bob}", SVC, "1")

    routed = route(with_executor, "bob", -1, load_stale_ms=1_000, gone_after_ms=2_000, heartbeat_ms=100)
    assert routed == {"pod_id": 2, "previous": 1, "outcome": "moved"}
    assert redis_db.get(link("bob")) == "2" and redis_db.ttl(link("bob")) == -1
    assert redis_db.hgetall("sf:{game:lk:bob}") == {SVC: "2"}


@pytest.mark.parametrize("alive", ["draining", "stale for new users", "never reported", "other tool's report"])
def test_a_user_of_an_alive_pod_stays_and_nothing_is_written(alive: str, with_executor: ExecutorRun,
                                                           redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {2: "Ready"}, {2: 0})
    if alive == "draining":
        seed_pods(redis_db, {1: "Draining"}, {1: 0})
    elif alive == "stale for new users":  # older than --load-stale-ms, younger than --gone-after-ms
        seed_pods(redis_db, {1: "Ready"}, {1: 0}, age_ms=1_500)
    elif alive == "never reported":  # an application that only sets states, as with the old executors
        seed_pods(redis_db, {1: "Ready"}, {})
    else:
        seed_pods(redis_db, {1: "Ready"}, {})
        redis_db.hset(LOADS, "1", "busy")
    redis_db.set(link("bob"), "1", ex=100)
    before, writes = snapshot(redis_db), write_counts(redis_db)

    routed = route(with_executor, "bob", -1, load_stale_ms=1_000, gone_after_ms=2_000, heartbeat_ms=100)
    assert routed == {"pod_id": 1, "previous": 1, "outcome": "kept"}
    assert snapshot(redis_db) == before  # no TTL reset, no load counted
    assert write_counts(redis_db) == writes


def test_a_draining_pod_gets_no_new_users(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Draining", 2: "Ready"}, {1: 0, 2: 50})
    assert {route(with_executor, f"u{i}")["pod_id"] for i in range(20)} == {2}


def test_no_eligible_pod_for_a_moved_user_writes_nothing_on_their_slot(with_executor: ExecutorRun,
                                                                      redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Down", 2: "Draining"}, {1: 0, 2: 0})
    redis_db.set(link("carol"), "1")
    before, writes = snapshot(redis_db), write_counts(redis_db)
    assert route(with_executor, "carol") == {"pod_id": None, "previous": 1, "outcome": "none"}
    assert route(with_executor, "dave") == {"pod_id": None, "previous": None, "outcome": "none"}
    assert snapshot(redis_db) == before and write_counts(redis_db) == writes


def test_compute_linked_pod_answers_route_users_pod(with_executor: ExecutorRun, redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Down", 2: "Ready"}, {2: 0})
    redis_db.set(link("erin"), "1")
    assert with_executor(lambda ex: ex.compute_linked_pod(NS, "erin", SVC, -1)) == 2
    assert redis_db.get(link("erin")) == "2"


def test_racing_routes_of_a_moved_user_agree_and_one_moves(with_executor: ExecutorRun,
                                                           redis_db: redis.Redis) -> None:
    seed_pods(redis_db, {1: "Down", **{pod: "Ready" for pod in range(2, 10)}}, {pod: 0 for pod in range(2, 10)})
    for i in range(50):
        redis_db.set(link(f"u{i}"), "1")

    async def body(ex: Executor) -> list[dict[str, Any]]:
        return await asyncio.gather(*(ex.route_user(NS, f"u{i % 50}", SVC, -1) for i in range(50 * 8)))

    answers = with_executor(body)
    by_user: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for i, answer in enumerate(answers):
        by_user[f"u{i % 50}"].append(answer)
    for uid, routed in by_user.items():
        assert len({r["pod_id"] for r in routed}) == 1, routed
        assert [r["outcome"] for r in routed].count("moved") == 1, routed
        assert str(routed[0]["pod_id"]) == redis_db.get(link(uid))
