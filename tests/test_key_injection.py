"""Key injection: the validator (rpc.check_name, rpc.check_uid) and the key builder (executor.Keys)
together must never let two distinct valid (ns, uid, service) tuples share a Redis key, of the
same kind or across kinds; otherwise one user could read or overwrite another's link or a
service's state (SPEC section 2, "Arguments")."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from statefuld.config import Config
from statefuld.errors import InvalidArgument
from statefuld.executor import Keys
from statefuld.rpc import check_name, check_uid

KEYS = Keys("sf")


def _valid(check: Any, value: str) -> bool:
    try:
        check("p", value, Config())
    except InvalidArgument:
        return False
    return True


def _pieces(parts: list[str], max_parts: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(parts), min_size=1, max_size=max_parts).map("".join)


# Strings rich in what could make keys collide (the layout's own words, its separators and
# braces, spaces of every kind, non-ASCII), and arbitrary text; the validators keep the valid ones.
_TRICKY = ["a", "lk", "state", "workload", "load", "sf", "é", ":", "{", "}", " ", "\u00a0", "\u2028", "\u3000",
           "\x85", "\x00"]
NAMES = st.one_of(_pieces(_TRICKY, 5), st.text(min_size=1, max_size=8)).filter(lambda s: _valid(check_name, s))
UIDS = st.one_of(_pieces(_TRICKY, 7), st.text(min_size=1, max_size=10)).filter(lambda s: _valid(check_uid, s))
TUPLES = st.tuples(NAMES, UIDS, NAMES)


def keys_of(ns: str, uid: str, service: str) -> dict[str, tuple[str, ...]]:
    """Every key a call with this tuple can touch, with the part of the tuple it stands for."""
    keys = {
        KEYS.link(ns, uid, service): ("link", ns, uid, service),
        KEYS.link_hash(ns, uid): ("links", ns, uid),
        KEYS.service_state(ns, service): ("state", ns, service),
        KEYS.pod_load(ns, service): ("load", ns, service),
        KEYS.workload_state(ns, service): ("workload", ns, service),
    }
    assert len(keys) == 5, keys  # the five kinds never coincide for one tuple either
    return keys


# Each kind of key as literals and slots, in Keys' format; a slot is (part name, its validator).
NS, UID, SVC = ("ns", check_name), ("uid", check_uid), ("service", check_name)
TEMPLATES: dict[str, list[Any]] = {
    "link": ["sf:{", NS, ":lk:", UID, "}", SVC],
    "links": ["sf:{", NS, ":lk:", UID, "}"],
    "state": ["sf:{", NS, ":state:", SVC, "}"],
    "load": ["sf:{", NS, ":state:", SVC, "}load"],
    "workload": ["sf:{", NS, ":workload:", SVC, "}"],
}


def _splits(template: list[Any], key: str) -> list[tuple[str, ...]]:
    """Every way to read ``key`` as ``template``: the slot values, in order."""
    if not template:
        return [()] if key == "" else []
    head, rest = template[0], template[1:]
    if isinstance(head, str):
        return _splits(rest, key[len(head):]) if key.startswith(head) else []
    return [(key[:end], *tail) for end in range(1, len(key) + 1) for tail in _splits(rest, key[end:])]


def valid_readings(key: str) -> set[tuple[str, ...]]:
    """Every (kind, parts...) that a valid tuple could have produced ``key`` from."""
    readings = set()
    for kind, template in TEMPLATES.items():
        checks = [slot[1] for slot in template if not isinstance(slot, str)]
        for parts in _splits(template, key):
            if all(_valid(check, part) for check, part in zip(checks, parts, strict=True)):
                readings.add((kind, *parts))
    return readings


@settings(max_examples=400, deadline=None)
@given(t=TUPLES)
@example(t=("a", "a:lk:a", "load"))
@example(t=("a", "lk:state: ", "state"))
def test_every_key_reads_back_as_exactly_its_own_tuple(t: tuple[str, str, str]) -> None:
    # Complete: any other valid tuple giving the same key would be a second reading of it.
    for key, meaning in keys_of(*t).items():
        assert valid_readings(key) == {meaning}, key


@settings(max_examples=150, deadline=None)
@given(a=TUPLES, b=TUPLES)
# Valid tuples that look alike: a uid holding the layout's words and separators.
@example(a=("a", "a:lk:a", "load"), b=("a", "a", "load"))
def test_distinct_valid_tuples_never_share_a_key(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    of_a, of_b = keys_of(*a), keys_of(*b)
    for key, meaning in of_a.items():
        if key in of_b:
            assert of_b[key] == meaning, f"{a} and {b} share {key!r}"


@settings(max_examples=200, deadline=None)
@given(t=TUPLES)
def test_a_users_keys_share_one_hash_tag_and_a_services_keys_another(t: tuple[str, str, str]) -> None:
    ns, uid, service = t

    def tag(key: str) -> str:  # what Redis Cluster hashes: from the first '{' to the next '}'
        start = key.index("{")
        return key[start + 1:key.index("}", start)]

    assert tag(KEYS.link(ns, uid, service)) == tag(KEYS.link_hash(ns, uid)) == f"{ns}:lk:{uid}"
    assert tag(KEYS.pod_load(ns, service)) == tag(KEYS.service_state(ns, service)) == f"{ns}:state:{service}"


def test_the_separators_that_would_collide_are_refused() -> None:
    # Without these rules ("a", "b}x", "c") and ("a", "b", "}xc")-like tuples could meet.
    for bad_name in ("a:lk", "a{", "a}", "a b", "a\u00a0", "a\u2028", "a\x85"):
        assert not _valid(check_name, bad_name), bad_name
    for bad_uid in ("b}lobby", "{b", "b\x85", "b\x00"):
        assert not _valid(check_uid, bad_uid), bad_uid
    # A uid may hold ':' and spaces: the uid is the last part of the hash tag, closed by '}'.
    assert _valid(check_uid, "user: 1\u3000")
