"""`statefuld audit` over a large keyspace (docs/BENCHMARKS.md, "statefuld audit").

    .venv/bin/python benchmarks/audit.py [--keys 1000000]

Starts a private redis-server, fills it with --keys keys in statefuld's layout (users with a
persistent link and its hash field, users with a temporary link, a few services' states, loads
and workloads, and a sprinkle of findings), then runs `statefuld audit --json` twice: at its
default pace and unpaced. For each run: wall time, the Redis server's CPU time (INFO cpu), the
commands Redis processed and their rate, and the audit's own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from support import RedisServer, running  # noqa: E402

SERVICES = 10
PODS = 20


def fill(r: object, keys: int) -> None:
    persistent = keys * 45 // 100  # two keys each: the link and the user's hash
    temporary = keys - 2 * persistent - SERVICES * 3
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for i in range(persistent):
        svc, pod = f"svc{i % SERVICES}", str(i % PODS)
        pipe.set(f"sf:{{game:lk:u{i}}}{svc}", pod if i % 10_000 else "not-a-pod")
        pipe.hset(f"sf:{{game:lk:u{i}}}", svc, pod)
        if i % 5000 == 0:
            pipe.execute()
    for i in range(temporary):
        pipe.set(f"sf:{{game:lk:t{i}}}svc0", str(i % PODS), ex=3600)
        if i % 5000 == 0:
            pipe.execute()
    for s in range(SERVICES):
        pipe.hset(f"sf:{{game:state:svc{s}}}", mapping={str(p): "Ready" for p in range(PODS - 1)})
        pipe.hset(f"sf:{{game:state:svc{s}}}load", mapping={str(p): f"0:{now_ms}" for p in range(PODS)})
        pipe.set(f"sf:{{game:workload:svc{s}}}", "Serving" if s else "null")
    pipe.execute()


def redis_cpu_s(r: object) -> float:
    info = r.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commands(r: object) -> int:
    return int(r.info("stats")["total_commands_processed"])  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with running(RedisServer()) as server:
        r = server.client()
        started = time.perf_counter()
        fill(r, args.keys)
        print(f"filled {r.dbsize():,} keys in {time.perf_counter() - started:.0f} s")
        for label, pace in (("default pace (--max-keys-per-s 20000)", []),
                            ("unpaced (--max-keys-per-s 1e9)", ["--max-keys-per-s", "1000000000"])):
            cpu_before, commands_before = redis_cpu_s(r), commands(r)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "statefuld", "audit", "--redis-url", server.url, "--json",
                                   *pace], capture_output=True, text=True, timeout=3600)
            elapsed = time.perf_counter() - started
            peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            cpu, sent = redis_cpu_s(r) - cpu_before, commands(r) - commands_before - 2
            report = json.loads(done.stdout)
            found = {k: f["count"] for k, f in report["findings"].items() if f["count"]}
            print(f"{label}: {report['scanned_keys']:,} keys in {elapsed:.1f} s "
                  f"({report['scanned_keys'] / elapsed:,.0f} keys/s); Redis CPU {cpu:.1f} s "
                  f"({cpu / elapsed * 100:.0f}% of one core); {sent:,} commands, {sent / elapsed:,.0f}/s, "
                  f"{sent / report['scanned_keys']:.2f} per key; audit peak RSS {peak_mib:.0f} MiB; found {found}")


if __name__ == "__main__":
    main()
