#!/usr/bin/env python3
"""Generate statefuld_client/_sync_api.py from _async_api.py, as httpcore does with unasync.

The typed methods of both clients are the same 20-odd signatures and docstrings; writing them twice
would let them drift. Only this layer is generated: the two transports (a lock around one write and
one read, versus a multiplexed asyncio protocol) differ too much to share text.

Usage: unasync.py            rewrite _sync_api.py
       unasync.py --check    exit 1 if _sync_api.py is out of date (the test suite runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "statefuld_client"
SOURCE = PACKAGE / "_async_api.py"
TARGET = PACKAGE / "_sync_api.py"

HEADER = '''"""The daemon's methods, typed, for the blocking client.

GENERATED from _async_api.py by client_py/scripts/unasync.py: do not edit, edit the source and rerun.
"""
'''

# Order matters: the longer names first.
SUBSTITUTIONS = [
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"\basync with\b", "with"),
    (r"\bAsyncAPI\b", "SyncAPI"),
    (r"\bAsyncClient\b", "Client"),
    (r"\baclose\b", "close"),
    (r"asyncio client", "blocking client"),
]


def generate() -> str:
    source = SOURCE.read_text()
    # Drop the source's module docstring (it describes the generation) for the generated header.
    body = re.sub(r'\A""".*?"""\n', "", source, count=1, flags=re.DOTALL)
    for pattern, replacement in SUBSTITUTIONS:
        body = re.sub(pattern, replacement, body)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
