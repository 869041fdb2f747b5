"""The link scripts as the artifact the Go/Java executors share: run by SHA straight on Redis.

Each case seeds the user's two keys in the layout of SPEC section 1, runs one script with
EVALSHA, and checks the reply and exactly what is left in Redis: the link's value and TTL, the
hash field, and that nothing else was written.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from support import REPO

from statefuld.scripts import load_scripts, scripts_dir

LINK_SCRIPTS = (
    "set_linked_pod", "try_set_linked_pod", "set_linked_pod_if_absent",
    "get_linked_pod_if_persist", "remove_linked_pod", "remove_linked_pod_with_id",
)
HASH = "sf:{game:lk:alice}"
LINK = "sf:{game:lk:alice}lobby"
SVC = "lobby"
LONG_TTL_S = 1000  # a temporary link's TTL before the call; every TTL a call sets is shorter
TTL_S = 30

# Seeded link states: None = no link; ("persistent", pod); ("temporary", pod) with LONG_TTL_S left.
ABSENT = None
P3 = ("persistent", 3)
P5 = ("persistent", 5)
T3 = ("temporary", 3)


def seed(r: redis.Redis, link: tuple[str, int] | None) -> None:
    if link is None:
        return
    kind, pod = link
    if kind == "persistent":
        r.set(LINK, pod)
        r.hset(HASH, SVC, pod)
    else:
        r.set(LINK, pod, ex=LONG_TTL_S)


def left_behind(r: redis.Redis) -> tuple[Any, ...]:
    """(pod, ttl, hash field) of the link; ttl is -1 (persistent), 'long', TTL_S, or None."""
    assert set(r.keys("*")) <= {HASH, LINK}, r.keys("*")
    pod = r.get(LINK)
    ttl: Any = None
    if pod is not None:
        pttl = r.pttl(LINK)
        if pttl == -1:
            ttl = -1
        elif (LONG_TTL_S - 5) * 1000 < pttl <= LONG_TTL_S * 1000:
            ttl = "long"
        else:
            assert (TTL_S - 5) * 1000 < pttl <= TTL_S * 1000, pttl
            ttl = TTL_S
    field = r.hget(HASH, SVC)
    if field is None:
        # Redis deletes an emptied hash: no empty hash may be left behind.
        assert r.exists(HASH) == 0
    return (None if pod is None else int(pod), ttl, None if field is None else int(field))


def run_script(r: redis.Redis, name: str, *args: Any) -> Any:
    source = (scripts_dir() / f"{name}.lua").read_bytes()
    sha = hashlib.sha1(source).hexdigest()
    assert r.script_load(source) == sha  # what other executors rely on: the file's SHA is the script's
    return r.evalsha(sha, 2, HASH, LINK, *args)


GONE = (None, None, None)


@pytest.mark.parametrize(
    ("before", "persist_seconds", "reply", "after"),
    [
        (ABSENT, -1, None, (5, -1, 5)),
        (ABSENT, TTL_S, None, (5, TTL_S, None)),
        (P3, -1, "3", (5, -1, 5)),
        (P3, TTL_S, "3", (5, TTL_S, None)),  # a persistent link made temporary leaves the hash
        (T3, -1, "3", (5, -1, 5)),  # a temporary link made persistent loses its TTL
        (T3, TTL_S, "3", (5, TTL_S, None)),
    ],
)
def test_set_linked_pod_always_overwrites(redis_db: redis.Redis, before: Any, persist_seconds: int, reply: Any,
                                          after: Any) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "set_linked_pod", SVC, 5, persist_seconds) == reply
    assert left_behind(redis_db) == after


@pytest.mark.parametrize(
    ("before", "persist_seconds", "reply", "after"),
    [
        (ABSENT, -1, [1, "5"], (5, -1, 5)),
        (ABSENT, TTL_S, [1, "5"], (5, TTL_S, None)),
        (P3, -1, [0, "3"], (3, -1, 3)),  # persistent to another pod: refused, unchanged
        (P3, TTL_S, [0, "3"], (3, -1, 3)),
        (P5, TTL_S, [1, "5"], (5, TTL_S, None)),  # persistent to the same pod: set, as set_linked_pod
        (P5, -1, [1, "5"], (5, -1, 5)),
        (T3, -1, [1, "5"], (5, -1, 5)),  # a temporary link does not hold the user
        (T3, TTL_S, [1, "5"], (5, TTL_S, None)),
    ],
)
def test_try_set_linked_pod_refuses_only_a_persistent_link_to_another_pod(
    redis_db: redis.Redis, before: Any, persist_seconds: int, reply: Any, after: Any
) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "try_set_linked_pod", SVC, 5, persist_seconds) == reply
    assert left_behind(redis_db) == after


@pytest.mark.parametrize(
    ("before", "persist_seconds", "reply", "after"),
    [
        (ABSENT, -1, "5", (5, -1, 5)),
        (ABSENT, TTL_S, "5", (5, TTL_S, None)),
        (P3, TTL_S, "3", (3, -1, 3)),
        (P5, TTL_S, "5", (5, -1, 5)),  # even the same pod: nothing changes, persistence included
        (T3, -1, "3", (3, "long", None)),  # a temporary link counts, and its TTL is not reset
    ],
)
def test_set_linked_pod_if_absent_changes_nothing_when_any_link_exists(
    redis_db: redis.Redis, before: Any, persist_seconds: int, reply: Any, after: Any
) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "set_linked_pod_if_absent", SVC, 5, persist_seconds) == reply
    assert left_behind(redis_db) == after


@pytest.mark.parametrize(
    ("before", "reply", "after"),
    [(ABSENT, None, GONE), (P3, "3", (3, -1, 3)), (T3, None, (3, "long", None))],
)
def test_get_linked_pod_if_persist_reads_without_changing(redis_db: redis.Redis, before: Any, reply: Any,
                                                          after: Any) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "get_linked_pod_if_persist") == reply
    assert left_behind(redis_db) == after


@pytest.mark.parametrize(
    ("before", "persist_seconds", "reply", "after"),
    [
        (ABSENT, -1, 0, GONE),
        (ABSENT, TTL_S, 0, GONE),
        (P3, -1, 1, GONE),
        (T3, -1, 1, GONE),
        (P3, TTL_S, 1, (3, TTL_S, None)),  # lingers as a temporary link, leaves the hash at once
        (T3, TTL_S, 1, (3, TTL_S, None)),  # the TTL becomes N even though more was left
    ],
)
def test_remove_linked_pod(redis_db: redis.Redis, before: Any, persist_seconds: int, reply: int,
                           after: Any) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "remove_linked_pod", SVC, persist_seconds) == reply
    assert left_behind(redis_db) == after


@pytest.mark.parametrize(
    ("before", "persist_seconds", "reply", "after"),
    [
        (ABSENT, -1, 0, GONE),
        (P3, -1, 1, GONE),
        (P3, TTL_S, 1, (3, TTL_S, None)),
        (T3, -1, 1, GONE),
        (T3, TTL_S, 1, (3, TTL_S, None)),
        (P5, -1, 0, (5, -1, 5)),  # points at another pod: nothing changed
        (P5, TTL_S, 0, (5, -1, 5)),
    ],
)
def test_remove_linked_pod_with_id_only_when_the_link_points_at_the_pod(
    redis_db: redis.Redis, before: Any, persist_seconds: int, reply: int, after: Any
) -> None:
    seed(redis_db, before)
    assert run_script(redis_db, "remove_linked_pod_with_id", SVC, persist_seconds, 3) == reply
    assert left_behind(redis_db) == after


def test_remove_heals_a_hash_field_whose_link_key_is_gone(redis_db: redis.Redis) -> None:
    # Another tool (or a lost write) left the field without its link: removing reports "no
    # link" and still takes the service out of the persistent list.
    redis_db.hset(HASH, SVC, 3)
    assert run_script(redis_db, "remove_linked_pod", SVC, -1) == 0
    assert redis_db.keys("*") == []


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("set_linked_pod", (SVC, 5, TTL_S)),
        ("try_set_linked_pod", (SVC, 5, TTL_S)),
        ("set_linked_pod_if_absent", (SVC, 5, TTL_S)),
        ("remove_linked_pod", (SVC, -1)),
        ("remove_linked_pod_with_id", (SVC, -1, 3)),
    ],
)
def test_a_users_other_services_are_left_alone(redis_db: redis.Redis, name: str, args: tuple[Any, ...]) -> None:
    seed(redis_db, P3)
    redis_db.hset(HASH, "chat", 9)
    redis_db.set(HASH + "chat", 9)
    run_script(redis_db, name, *args)
    # The hash keeps the other service (it is not emptied, so it is not deleted).
    assert redis_db.hget(HASH, "chat") == "9"
    assert redis_db.get(HASH + "chat") == "9" and redis_db.ttl(HASH + "chat") == -1


def test_pod_ids_written_with_leading_zeros_by_another_tool_match_numerically(redis_db: redis.Redis) -> None:
    redis_db.set(LINK, "003")
    redis_db.hset(HASH, SVC, "003")
    assert run_script(redis_db, "try_set_linked_pod", SVC, 3, -1) == [1, "3"]
    assert run_script(redis_db, "remove_linked_pod_with_id", SVC, -1, 3) == 1


@pytest.mark.parametrize("name", LINK_SCRIPTS)
def test_every_script_opens_with_its_header(name: str) -> None:
    source = (REPO / "lua_scripts" / f"{name}.lua").read_text()
    header = "\n".join(line for line in source.splitlines() if line.startswith("--"))
    assert source.startswith(f"-- {name}: ")
    assert re.search(r"^-- KEYS\[1\]\s+P:\{NS:lk:UID\}\s", header, re.MULTILINE)
    assert re.search(r"^-- KEYS\[2\]\s+P:\{NS:lk:UID\}SVC\s", header, re.MULTILINE)
    assert re.search(r"^-- ARGV", header, re.MULTILINE)
    assert re.search(r"^-- Reply:", header, re.MULTILINE)


def test_the_daemon_loads_every_file_as_is(redis_db: redis.Redis) -> None:
    scripts = load_scripts()
    assert set(LINK_SCRIPTS) <= set(scripts)
    for name in LINK_SCRIPTS:
        path: Path = REPO / "lua_scripts" / f"{name}.lua"
        assert scripts[name].sha == hashlib.sha1(path.read_bytes()).hexdigest()
        assert redis_db.script_load(scripts[name].source) == scripts[name].sha
