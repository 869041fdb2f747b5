"""`statefuld audit`: read a live Redis and report the data statefuld would read differently from
the in-process executors, or refuse to touch (docs/MIGRATION.md says what each kind means).

Read-only and paced: SCAN on every primary, then, per batch of keys, the reads that classify
them (TYPE, GET/HGETALL, PTTL, the other half of a user's links), sent together so each batch is
one round trip per node, and no more than ``max_keys_per_s`` keys a second. Users are counted per
pod as the scan goes; at the end each pod with users is judged as route_user judges it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from statefuld.config import Config
from statefuld.errors import InvalidArgument
from statefuld.executor import Keys, PodRules, parse_pod_id, parse_report, read_pods
from statefuld.notifications import PROBE_MARK
from statefuld.redis_mux import ReplyError
from statefuld.rpc import check_name, check_uid
from statefuld.transports import Transport, detect_mode, make_transport

# (id, what it means for a migration), in the order the report lists them.
KINDS: dict[str, str] = {
    "layout_broken": "keys under the prefix that are not in the layout or break its hash tags "
                     "(a '{' or '}' in a name): out of statefuld's reach",
    "refused_names": "keys whose namespace, service or uid statefuld refuses (':' or whitespace in a name, "
                     "control characters, too long): no call can name them",
    "wrong_type": "layout keys of another Redis type than the layout's: statefuld answers INTERNAL for them",
    "link_not_pod_id": "links whose value is not a pod id: get_linked_pod answers INTERNAL, batch reads leave "
                       "the user out, set_linked_pod answers nil as the previous pod",
    "persistent_link_missing_from_hash": "persistent links missing from the user's hash: get_link_service does "
                                         "not list them",
    "link_hash_disagrees": "persistent links whose user hash names another pod: get_link_service and "
                           "get_linked_pod disagree",
    "hash_field_without_link": "user hash fields without their link key: get_link_service lists a service "
                               "get_linked_pod does not know",
    "hash_field_on_temporary_link": "user hash fields for a temporary link: get_link_service lists a link "
                                    "that will expire",
    "hash_value_not_pod_id": "user hash fields whose value is not a pod id: get_link_service leaves them out",
    "workload_none_values": "workload states \"\", \"null\" or \"nil\": the Go executor reads them as none, "
                            "statefuld returns them as stored",
    "state_field_not_pod_id": "service state fields that are not pod ids: get_service_state and the pick "
                              "ignore them",
    "load_report_unreadable": "load reports that are not \"<load>:<unix ms>\": the pick never chooses that pod",
    "gone_pod_with_users": "pods route_user would judge gone while users are linked to them: those users "
                           "move at their next route_user",
}

_NONE_WORKLOADS = (b"", b"null", b"nil")
_KINDS_OF_KEY = ("state", "workload", "lk")


@dataclass
class Finding:
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    scanned: int = 0
    findings: dict[str, Finding] = field(default_factory=lambda: {kind: Finding() for kind in KINDS})
    examples_max: int = 5

    def add(self, kind: str, example: str) -> None:
        finding = self.findings[kind]
        finding.count += 1
        if len(finding.examples) < self.examples_max:
            finding.examples.append(example)

    @property
    def found(self) -> int:
        return sum(f.count for f in self.findings.values())

    def as_json(self) -> dict[str, Any]:
        return {"scanned_keys": self.scanned, "found": self.found,
                "findings": {kind: {"count": f.count, "examples": f.examples, "meaning": KINDS[kind]}
                             for kind, f in self.findings.items()}}


@dataclass(frozen=True)
class LayoutKey:
    """A key of the layout, parsed: kind "state", "load", "workload", "link_hash" or "link"."""

    kind: str
    ns: str
    name: str  # the service (state, load, workload) or the uid (link_hash, link)
    service: str = ""  # a link's service


def parse_key(key: str, prefix: str) -> LayoutKey | str:
    """The key as a layout key, or the finding kind it falls under ("layout_broken" or "refused_names")."""
    body = key[len(prefix) + 1:]
    if not body.startswith("{") or body.count("{") != 1 or body.count("}") != 1:
        return "layout_broken"
    tag, _, suffix = body[1:].partition("}")
    ns, _, rest = tag.partition(":")
    kind, _, name = rest.partition(":")
    if kind not in _KINDS_OF_KEY:
        # An ns holding ':' ("a:b:lk:uid") is a name statefuld refuses, not a foreign key.
        return "refused_names" if any(f":{k}:" in tag for k in _KINDS_OF_KEY) else "layout_broken"
    parsed = _layout_key(kind, ns, name, suffix)
    if parsed is None:
        return "layout_broken"
    return parsed if _names_accepted(parsed) else "refused_names"


def _layout_key(kind: str, ns: str, name: str, suffix: str) -> LayoutKey | None:
    if kind == "state" and suffix in ("", "load"):
        return LayoutKey("load" if suffix else "state", ns, name)
    if kind == "workload" and not suffix:
        return LayoutKey("workload", ns, name)
    if kind == "lk":
        return LayoutKey("link" if suffix else "link_hash", ns, name, suffix)
    return None


def _names_accepted(key: LayoutKey) -> bool:
    """Whether statefuld's argument rules let a call name this key's ns, service and uid."""
    try:
        check_name("ns", key.ns, _ANY_CONFIG)
        if key.kind in ("link", "link_hash"):
            check_uid("uid", key.name, _ANY_CONFIG)
            if key.service:
                check_name("service", key.service, _ANY_CONFIG)
        else:
            check_name("service", key.name, _ANY_CONFIG)
    except InvalidArgument:
        return False
    return True


_ANY_CONFIG = Config(socket_path="unused")
_EXPECTED_TYPE = {"state": b"hash", "load": b"hash", "workload": b"string", "link_hash": b"hash", "link": b"string"}


def _shown(value: bytes | None) -> str:
    if value is None:
        return "(none)"
    text = value[:40].decode("utf-8", "replace")
    return repr(text) + ("..." if len(value) > 40 else "")


class Audit:
    def __init__(self, transport: Transport, config: Config, *, examples: int, max_keys_per_s: float,
                 scan_count: int, progress: Callable[[str], None] | None = None, progress_s: float = 5.0) -> None:
        self._redis = transport
        self._prefix = config.key_prefix
        self._keys = Keys(config.key_prefix)
        self._rules = PodRules.of(config)
        self._max_keys_per_s = max_keys_per_s
        self._scan_count = scan_count
        self._progress = progress
        self._progress_s = progress_s
        self.report = Report(examples_max=examples)
        # (ns, service, pod) -> users linked to it, for the gone check at the end.
        self._users: Counter[tuple[str, str, int]] = Counter()

    async def run(self) -> Report:
        started = last_progress = time.monotonic()
        pattern = _glob_escape(self._prefix) + ":*"
        for node, execute in enumerate(self._redis.primaries()):
            cursor = b"0"
            while True:
                cursor, keys = await execute("SCAN", cursor, "MATCH", pattern, "COUNT", self._scan_count)
                await self._classify([k.decode("utf-8", "surrogateescape") for k in keys])
                self.report.scanned += len(keys)
                now = time.monotonic()
                # Paced: never ahead of max_keys_per_s on average since the start.
                ahead_s = self.report.scanned / self._max_keys_per_s - (now - started)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
                if self._progress is not None and now - last_progress >= self._progress_s:
                    last_progress = now
                    self._progress(f"audit: {self.report.scanned} keys scanned (node {node + 1}), "
                                   f"{self.report.found} findings so far")
                if cursor in (b"0", 0):
                    break
        await self._judge_pods_with_users()
        return self.report

    async def _classify(self, keys: list[str]) -> None:
        parsed: list[tuple[str, LayoutKey]] = []
        probe = f"{self._prefix}:{PROBE_MARK}:"
        for key in keys:
            if key.startswith(probe):
                continue  # a watch's probe key, gone within a millisecond
            result = parse_key(key, self._prefix)
            if isinstance(result, str):
                self.report.add(result, key)
            else:
                parsed.append((key, result))
        await asyncio.gather(*(self._check(key, layout) for key, layout in parsed))

    async def _check(self, key: str, layout: LayoutKey) -> None:
        try:
            kind = await self._redis.execute(key, "TYPE", key)
            if kind == b"none":
                return  # expired or deleted since the scan listed it
            if kind != _EXPECTED_TYPE[layout.kind]:
                self.report.add("wrong_type", f"{key} is a {kind.decode()}")
                return
            await _CHECKS[layout.kind](self, key, layout)
        except ReplyError as exc:  # a key that changed type between two reads
            self.report.add("wrong_type", f"{key}: {exc.kind}")

    async def _check_state(self, key: str, layout: LayoutKey) -> None:
        flat = await self._redis.execute(key, "HGETALL", key)
        for i in range(0, len(flat), 2):
            if parse_pod_id(flat[i]) is None:
                self.report.add("state_field_not_pod_id", f"{key} field {_shown(flat[i])}")

    async def _check_load(self, key: str, layout: LayoutKey) -> None:
        flat = await self._redis.execute(key, "HGETALL", key)
        for i in range(0, len(flat), 2):
            if parse_pod_id(flat[i]) is not None and parse_report(flat[i + 1]) is None:
                self.report.add("load_report_unreadable", f"{key} field {_shown(flat[i])} = {_shown(flat[i + 1])}")

    async def _check_workload(self, key: str, layout: LayoutKey) -> None:
        value = await self._redis.execute(key, "GET", key)
        if value in _NONE_WORKLOADS:
            self.report.add("workload_none_values", f"{key} = {_shown(value)}")

    async def _check_link(self, key: str, layout: LayoutKey) -> None:
        value, ttl_ms = await asyncio.gather(self._redis.execute(key, "GET", key),
                                             self._redis.execute(key, "PTTL", key))
        pod = None if value is None else parse_pod_id(value)
        if value is not None and pod is None:
            self.report.add("link_not_pod_id", f"{key} = {_shown(value)}")
            return
        if pod is not None:
            self._users[(layout.ns, layout.service, pod)] += 1
        if ttl_ms != -1:
            return  # temporary (or gone meanwhile): its hash field, if any, is the hash's finding
        hash_key = self._keys.link_hash(layout.ns, layout.name)
        field_value = await self._redis.execute(hash_key, "HGET", hash_key, layout.service)
        if field_value is None:
            self.report.add("persistent_link_missing_from_hash", key)
        elif field_value != value:
            self.report.add("link_hash_disagrees", f"{key} = {_shown(value)}, its hash says {_shown(field_value)}")

    async def _check_link_hash(self, key: str, layout: LayoutKey) -> None:
        flat = await self._redis.execute(key, "HGETALL", key)
        fields = [(flat[i].decode("utf-8", "surrogateescape"), flat[i + 1]) for i in range(0, len(flat), 2)]
        for service, value in fields:
            if parse_pod_id(value) is None:
                self.report.add("hash_value_not_pod_id", f"{key} field {service!r} = {_shown(value)}")
        links = [self._keys.link(layout.ns, layout.name, service) for service, _ in fields]
        ttls = await asyncio.gather(*(self._redis.execute(link, "PTTL", link) for link in links))
        for (service, _), link, ttl_ms in zip(fields, links, ttls, strict=True):
            if ttl_ms == -2:
                self.report.add("hash_field_without_link", f"{key} field {service!r}")
            elif ttl_ms >= 0:
                self.report.add("hash_field_on_temporary_link", f"{key} field {service!r} ({link} expires)")

    async def _judge_pods_with_users(self) -> None:
        services = sorted({(ns, service) for ns, service, _ in self._users})
        for ns, service in services:
            try:
                pods = await read_pods(self._redis, self._keys, ns, service)
            except ReplyError:
                continue  # a state or load key of another type: already a wrong_type finding
            for (u_ns, u_service, pod), users in sorted(self._users.items()):
                if (u_ns, u_service) != (ns, service):
                    continue
                verdict = self._rules.judge(pod, pods.states.get(pod), pods.reports.get(pod), pods.now_ms)
                if verdict["status"] == "gone":
                    self.report.add("gone_pod_with_users",
                                    f"{ns}/{service} pod {pod}: {users} users linked, {verdict['why']}")


_CHECKS: dict[str, Callable[[Audit, str, LayoutKey], Awaitable[None]]] = {
    "state": Audit._check_state,
    "load": Audit._check_load,
    "workload": Audit._check_workload,
    "link": Audit._check_link,
    "link_hash": Audit._check_link_hash,
}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def run_audit(config: Config, **options: Any) -> Report:
    """Connect as the daemon would (the same URL forms, TLS and credentials), audit, disconnect.
    Raises Unavailable when Redis cannot be reached."""
    transport = make_transport(config, await detect_mode(config))
    try:
        await transport.connect()
        return await Audit(transport, config, **options).run()
    finally:
        await transport.close()


def report_table(report: Report, where: str) -> str:
    lines = [f"statefuld audit of {where}: {report.scanned} keys scanned"]
    width = max(len(kind) for kind in KINDS)
    for kind, finding in report.findings.items():
        lines.append(f"{kind.ljust(width)}  {finding.count:>8}  {KINDS[kind]}" if finding.count
                     else f"{kind.ljust(width)}  {0:>8}")
        for example in finding.examples:
            lines.append(f"{'':{width}}            e.g. {example}")
    lines.append("nothing found: statefuld reads this data as the executors do" if not report.found
                 else f"{report.found} findings: statefuld would read these differently (docs/MIGRATION.md)")
    return "\n".join(lines)
