"""`statefuld audit` against a real Redis (standalone here; the cluster and sentinel runs of
scripts/test repeat the tests that use the shared Redis): every kind of finding is found, with
examples, nothing is written, data written by statefuld itself gives a clean report and exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import redis
from support import NS, SVC, ExecutorRun, RedisServer, link_hash_key, link_key, loads_key, running, states_key

from statefuld.executor import Executor

STATES, LOADS = states_key(), loads_key()
WRITES = ("set", "hset", "hdel", "del", "expire", "pexpire", "unlink", "setex", "eval", "evalsha", "restore")


def audit(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "statefuld", "audit", "--redis-url", url, *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def write_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats[f"cmdstat_{name}"]["calls"]) for name in WRITES if f"cmdstat_{name}" in stats)


def contents(r: redis.Redis) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key in map(str, r.keys("*")):
        kind = r.type(key)
        result[key] = (kind, r.hgetall(key) if kind == "hash" else r.get(key) if kind == "string" else None)
    return result


def seed_every_kind(r: redis.Redis) -> None:
    now = redis_ms(r)
    r.set(link_key("bob"), "abc")  # link_not_pod_id
    r.set(link_key("carl"), "3")  # persistent_link_missing_from_hash (pod 3: alive, see below)
    r.set(link_key("dan"), "3")
    r.hset(link_hash_key("dan"), SVC, "4")  # link_hash_disagrees
    r.hset(link_hash_key("eve"), SVC, "3")  # hash_field_without_link
    r.set(link_key("fay"), "3", ex=300)
    r.hset(link_hash_key("fay"), SVC, "3")  # hash_field_on_temporary_link
    r.hset(link_hash_key("gus"), "arena", "x")  # hash_value_not_pod_id (and no link key)
    r.set(f"sf:{{{NS}:workload:{SVC}}}", "null")  # workload_none_values
    r.set(f"sf:{{{NS}:workload:arena}}", "")
    r.hset(STATES, mapping={"3": "Ready", "x": "Ready", "9": "Down"})  # state_field_not_pod_id
    r.hset(LOADS, mapping={"3": f"0:{now}", "5": "busy"})  # load_report_unreadable
    r.set(link_key("hal"), "9")  # gone_pod_with_users: pod 9 is Down
    r.hset(link_hash_key("hal"), SVC, "9")
    r.set("sf:{game:lk:ivy}lob}by", "3")  # layout_broken: a '}' in the service
    r.set("sf:plain", "1")  # layout_broken: no hash tag
    r.set("sf:{ga me:state:x}", "1")  # refused_names: whitespace in the ns
    r.set("sf:{a:b:lk:jo}lobby", "3")  # refused_names: ':' in the ns
    r.hset(f"sf:{{{NS}:workload:chat}}", "a", "b")  # wrong_type
    r.set("other:{game:lk:kim}lobby", "zzz")  # not under the prefix: not read


EXPECTED = {
    "layout_broken": 2, "refused_names": 2, "wrong_type": 1, "link_not_pod_id": 1,
    "persistent_link_missing_from_hash": 1, "link_hash_disagrees": 1, "hash_field_without_link": 2,
    "hash_field_on_temporary_link": 1, "hash_value_not_pod_id": 1, "workload_none_values": 2,
    "state_field_not_pod_id": 1, "load_report_unreadable": 1, "gone_pod_with_users": 1,
}


def test_audit_finds_every_kind_and_writes_nothing(redis_server: RedisServer, redis_db: redis.Redis) -> None:
    seed_every_kind(redis_db)
    before, writes = contents(redis_db), write_calls(redis_db)

    done = audit(redis_server.url, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert {kind: f["count"] for kind, f in report["findings"].items() if f["count"]} == EXPECTED
    assert report["found"] == sum(EXPECTED.values())
    assert report["scanned_keys"] == len(before) - 1  # all but the key of another prefix
    findings = report["findings"]
    assert findings["link_not_pod_id"]["examples"] == [f"{link_key('bob')} = 'abc'"]
    assert findings["link_hash_disagrees"]["examples"] == [f"{link_key('dan')} = '3', its hash says '4'"]
    assert findings["gone_pod_with_users"]["examples"] == [
        "game/lobby pod 9: 1 users linked, state Down is a gone state"]
    assert sorted(findings["layout_broken"]["examples"]) == ["sf:plain", "sf:{game:lk:ivy}lob}by"]
    assert all(f["meaning"] for f in findings.values())

    assert contents(redis_db) == before
    assert write_calls(redis_db) == writes

    # The table for people: each kind found, its count and an example; exit 1 as well.
    table = audit(redis_server.url, "--examples", "1")
    assert table.returncode == 1
    assert "link_hash_disagrees" in table.stdout and f"e.g. {link_key('dan')} = '3'" in table.stdout
    assert f"{sum(EXPECTED.values())} findings" in table.stdout.splitlines()[-1]


def test_data_written_by_statefuld_audits_clean(redis_server: RedisServer, redis_db: redis.Redis,
                                                with_executor: ExecutorRun) -> None:
    async def write(ex: Executor) -> None:
        for pod in range(3):
            await ex.hold_pod(NS, SVC, pod, "Ready", 0)
        await ex.set_workload_state(NS, SVC, "Serving")
        for i in range(30):
            await ex.route_user(NS, f"u{i}", SVC, -1 if i % 2 else 60)
        await ex.set_linked_pod(NS, "moved", SVC, 2, -1)
        await ex.remove_linked_pod(NS, "u1", SVC, 120)  # a temporary link left behind

    with_executor(write)
    done = audit(redis_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "nothing found: statefuld reads this data as the executors do"


def test_the_gone_check_follows_the_liveness_options(redis_server: RedisServer, redis_db: redis.Redis) -> None:
    redis_db.hset(STATES, "1", "Stopped")  # what an older route layer wrote for a dead pod
    redis_db.set(link_key("ann"), "1")
    redis_db.hset(link_hash_key("ann"), SVC, "1")
    assert audit(redis_server.url).returncode == 0  # "Stopped" is alive by default (not Down)
    done = audit(redis_server.url, "--gone-state", "Stopped", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["findings"]["gone_pod_with_users"]["count"] == 1


def test_audit_is_paced_and_reports_progress(start: Any) -> None:
    own = start(RedisServer())
    r = own.client()
    with r.pipeline(transaction=False) as pipe:
        for i in range(2000):
            pipe.set(link_key(f"u{i}"), "1", ex=600)
        pipe.execute()
    started = time.monotonic()
    done = audit(own.url, "--max-keys-per-s", "1000", "--scan-count", "100", "--progress-s", "0.2")
    elapsed = time.monotonic() - started
    assert done.returncode == 1  # pod 1 has no state: its 2,000 users would move
    assert elapsed >= 1.8  # 2,000 keys at 1,000 a second
    progress = [line for line in done.stderr.splitlines() if line.startswith("audit: ")]
    assert len(progress) >= 3 and "keys scanned" in progress[-1]


def test_audit_needs_a_reachable_redis() -> None:
    missing = subprocess.run([sys.executable, "-m", "statefuld", "audit"], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("STATEFULD_")})
    assert missing.returncode == 64 and "--redis-url" in missing.stderr
    with running(RedisServer()) as server:
        url = server.url
    down = audit(url)
    assert down.returncode == 69 and "cannot read" in down.stderr
