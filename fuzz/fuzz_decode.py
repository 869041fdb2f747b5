"""Coverage-guided fuzzing (atheris) of what the daemon does with a peer's bytes, without any I/O.

Each input is split into reads and fed to the daemon's own ``RpcProtocol.data_received`` (the
unpacker, its size accounting, the message shape checks), through the daemon's own calls.py (a
call's life and its reply) to ``rpc.validate`` (every argument rule), on a fake transport and a
dispatcher that stops where Redis would begin.

It fails (a crash libFuzzer saves to crash-*) when:
- data_received raises, or closes the connection for an exception that is not a MessagePack
  decoding error (a bug swallowed by its catch-all);
- a reply written is not a well-formed response, or a request is answered twice;
- validate accepts a call whose arguments break the contract (checked independently here).

Run it (see fuzz/README.md): .venv/bin/python fuzz/fuzz_decode.py /tmp/corpus fuzz/seeds -max_total_time=60
"""

from __future__ import annotations

import asyncio
import logging
import sys
import unicodedata
from typing import Any

import atheris

with atheris.instrument_imports(include=["statefuld"]):
    from statefuld.calls import Calls
    from statefuld.config import Config
    from statefuld.metrics import RequestMetrics
    from statefuld.protocol import Connections, RpcProtocol
    from statefuld.rpc import METHODS, validate

import msgpack

MAX_MESSAGE_BYTES = 4096
MAX_LIST_ITEMS = 50
CONFIG = Config(socket_path="/nonexistent/fuzz.sock", redis_url="unix:///nonexistent",
                max_message_bytes=MAX_MESSAGE_BYTES, max_list_items=MAX_LIST_ITEMS)
# What "undecodable MessagePack (X: ...)" may name: msgpack's own errors and its limits.
DECODE_ERRORS = ("FormatError", "StackError", "ExtraData", "OutOfData", "ValueError", "UnpackValueError")


class FuzzFinding(Exception):
    pass


# --- the contract's argument rules, written out independently of rpc.py ----------------------------


def _bad_text(value: Any, max_bytes: int, forbidden: str, no_space: bool) -> bool:
    if type(value) is not str:
        return True
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return True
    if not 1 <= size <= max_bytes:
        return True
    return any(c in forbidden or (no_space and c.isspace()) or unicodedata.category(c) == "Cc" for c in value)


def _breaks_contract(param: str, value: Any) -> bool:
    if param in ("ns", "service"):
        return _bad_text(value, 128, ":{}", no_space=True)
    if param == "uid":
        return _bad_text(value, 256, "{}", no_space=False)
    if param == "state":  # any text, control characters included
        return not _state_rule_ok(value)
    if param in ("pod_id", "load"):
        return type(value) is not int or not 0 <= value <= 2**31 - 1
    if param == "persist_seconds":
        return type(value) is not int or not (value == -1 or 1 <= value <= 2**31 - 1)
    if param == "format":
        return value not in ("map", "string") or type(value) is not str
    if param in ("services", "uids"):
        item = "service" if param == "services" else "uid"
        return type(value) is not list or len(value) > MAX_LIST_ITEMS or any(_breaks_contract(item, v) for v in value)
    raise FuzzFinding(f"unknown parameter {param!r}")


def _state_rule_ok(value: Any) -> bool:
    # state: any text, 1..4096 bytes of UTF-8 (control characters included).
    if type(value) is not str:
        return False
    try:
        return 1 <= len(value.encode("utf-8")) <= 4096
    except UnicodeEncodeError:
        return False


class ValidatingDispatcher:
    """rpc.Dispatcher's place: validate like the daemon, check the result, stop before Redis."""

    def start(self, name: Any, params: Any, connection: Any) -> Any:
        spec, args = validate(name, params, CONFIG)  # RpcError: calls.py answers it
        for param, value in zip(spec.params, args, strict=True):
            if _breaks_contract(param, value):
                raise FuzzFinding(f"validate accepted {param}={value!r} for {spec.name}")
        done = asyncio.get_running_loop().create_future()
        done.set_result("PONG" if spec.name == "ping" else None)
        return done


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        # As asyncio's and uvloop's transports: a write to a closing transport is not an error.
        if not self.closed:
            self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class CloseReasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


REASONS = CloseReasons()
logging.getLogger("statefuld").addHandler(REASONS)
logging.getLogger("statefuld").propagate = False
CONNECTIONS = Connections(CONFIG, Calls(CONFIG, ValidatingDispatcher(), RequestMetrics(METHODS)).session)
LOOP = asyncio.new_event_loop()
LOOP_ERRORS: list[str] = []  # an exception in a callback (a flush, a done-callback) is a finding too
LOOP.set_exception_handler(lambda loop, context: LOOP_ERRORS.append(repr(context.get("exception") or context)))


async def feed(chunks: list[bytes]) -> FakeTransport:
    transport = FakeTransport()
    protocol = RpcProtocol(CONNECTIONS)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if transport.closed:
            break
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    for _ in range(3):  # let the done-callbacks queue their replies, and the flush write them
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


def check_replies(written: bytes) -> None:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(written)
    for reply in unpacker:
        if type(reply) is not list or len(reply) != 4 or reply[0] != 1 or type(reply[1]) is not int:
            raise FuzzFinding(f"malformed reply {reply!r}")
        error = reply[2]
        if error is not None and (type(error) is not dict or set(error) != {"code", "message"}):
            raise FuzzFinding(f"malformed error {error!r}")


def test_one_input(data: bytes) -> None:
    # Byte 0: how many extra read boundaries (0..4); then 2 bytes for each; the rest is the stream.
    splits = data[0] % 5 if data else 0
    header = 1 + 2 * splits
    body = data[header:]
    cuts = sorted(int.from_bytes(data[1 + 2 * i : 3 + 2 * i], "big") % (len(body) + 1) for i in range(splits))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    REASONS.messages.clear()
    transport = LOOP.run_until_complete(feed(chunks))
    if LOOP_ERRORS:
        raise FuzzFinding(f"exception in a loop callback: {LOOP_ERRORS}")
    check_replies(bytes(transport.written))
    for message in REASONS.messages:
        if "undecodable MessagePack (" in message:
            name = message.split("undecodable MessagePack (", 1)[1].split(":", 1)[0]
            unhashable_key = name == "TypeError" and "unhashable" in message
            if name not in DECODE_ERRORS and not unhashable_key:
                raise FuzzFinding(f"connection closed for a non-decoding error: {message}")
        if "internal error" in message:
            raise FuzzFinding(message)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
