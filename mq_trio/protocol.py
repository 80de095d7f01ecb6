"""Protocol v1, sans-IO: bytes in, typed commands or failure reasons out, bytes back.

Nothing here knows about sockets or trio, so every rule of the wire contract can be
tested by feeding bytes (the h11/wsproto approach). Transports own the I/O.
"""

from __future__ import annotations

import decimal
import json
import re
from collections.abc import Callable
from typing import Literal

import attrs
import msgspec

# The exact failure texts of the contract (PROTOCOL.md section 2).
DECODE_ERROR = "Could not decode input as UTF-8"
PARSE_ERROR = "Could not parse json"
MALFORMED = "Malformed json message"
INTERNAL_ERROR = "Internal exception"
LINE_TOO_LONG = "Line too long"

DEFAULT_MAX_LINE_BYTES = 1 << 20

Delivery = Literal["all", "one"]


@attrs.frozen(slots=True)
class Subscribe:
    topic: str
    last_seen: int = -1
    cache: bool = True
    #: The epoch extension (docs/protocol.md): None for a version-1 subscribe.
    epoch: str | None = None


@attrs.frozen(slots=True)
class Unsubscribe:
    topic: str


# Not frozen: one is built per message, and a frozen attrs class sets each field through
# object.__setattr__ (0.48 us for these five fields against 0.15 us for plain slots).
@attrs.define(slots=True)
class Send:
    topic: str
    msg: str
    delivery: Delivery
    cache: bool = True
    # The command as received (stripped, UTF-8): a delivery is this object plus "index",
    # so it is cheaper and more faithful to splice the index into the bytes than to
    # re-encode. Empty for a Send built in code.
    raw: bytes = attrs.field(default=b"", repr=False, eq=False)


@attrs.frozen(slots=True)
class Failure:
    reason: str


@attrs.frozen(slots=True)
class Quit:
    pass


QUIT = Quit()

Command = Subscribe | Unsubscribe | Send
#: What one processed line turns into. ``None`` is a blank line (no reply).
LineEvent = Subscribe | Unsubscribe | Send | Failure | Quit | None


# --- validation -------------------------------------------------------------------

_SEND_KEYS = frozenset(("command", "topic", "msg", "delivery", "cache"))
_SUBSCRIBE_KEYS = frozenset(("command", "topic", "last_seen", "cache", "epoch"))
_UNSUBSCRIBE_KEYS = frozenset(("command", "topic"))
_MALFORMED = Failure(MALFORMED)
_PARSE_ERROR = Failure(PARSE_ERROR)
_DECODE_ERROR = Failure(DECODE_ERROR)


def validate(obj: object, raw: str = "") -> Command | Failure:
    """Turn a decoded JSON value into a command, or the ``Malformed json message`` failure.

    ``raw`` is the command's stripped text; a Send keeps it, encoded (see ``Send.raw``).

    ``type(x) is ...`` rather than ``isinstance`` because JSON booleans are not integers
    (and the other way round) under this contract.
    """
    if type(obj) is not dict:
        return _MALFORMED
    command = obj.get("command")
    topic = obj.get("topic")
    if type(topic) is not str:
        return _MALFORMED
    cache = obj.get("cache", True)
    if type(cache) is not bool:
        return _MALFORMED
    if command == "send":
        msg = obj.get("msg")
        delivery = obj.get("delivery")
        if (
            type(msg) is not str
            or (delivery != "all" and delivery != "one")
            or not _SEND_KEYS.issuperset(obj)
        ):
            return _MALFORMED
        try:
            encoded = raw.encode()
        except UnicodeEncodeError:
            # Only a str handed to parse_text can hold a lone surrogate (no strict UTF-8
            # decode makes one); without raw, encode_delivery writes escaped JSON.
            encoded = b""
        return Send(topic, msg, delivery, cache, encoded)
    if command == "subscribe":
        last_seen = obj.get("last_seen", -1)
        epoch = obj.get("epoch")
        if (
            type(last_seen) is not int
            or not _SUBSCRIBE_KEYS.issuperset(obj)
            or (type(epoch) is not str and "epoch" in obj)
        ):
            return _MALFORMED
        return Subscribe(topic, last_seen, cache, epoch)
    if command == "unsubscribe":
        if not _UNSUBSCRIBE_KEYS.issuperset(obj):
            return _MALFORMED
        return Unsubscribe(topic)
    return _MALFORMED


def _big_int(digits: str) -> int:
    return int(decimal.Decimal(digits))


_scan_once: Callable[[str, int], tuple[object, int]]
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> object:
    """``json.loads`` for text already stripped of whitespace, without its layers.

    json.loads -> decode -> raw_decode plus two whitespace regex matches were a visible
    share of the publish profile; the C scanner they end in is called directly here and
    raises the same errors (JSONDecodeError, ValueError, RecursionError).
    """
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


def parse_text_stdlib(text: str) -> LineEvent:
    """Parse one decoded command with the stdlib json scanner: the reference behaviour.

    Every input goes this way unless the msgspec fast path (``parse_text``) accepts it.
    """
    text = text.strip()
    if not text:
        return None
    if text == "quit":
        return QUIT
    try:
        obj = _loads(text)
    except json.JSONDecodeError:
        return _PARSE_ERROR
    except ValueError:
        # An integer of thousands of digits is valid JSON, but int() refuses to convert
        # it (Python's int_max_str_digits); Decimal has no such limit.
        try:
            obj = json.loads(text, parse_int=_big_int)
        except RecursionError:
            return _MALFORMED if is_valid_json(text) else _PARSE_ERROR
        except ValueError:
            return _PARSE_ERROR
    except RecursionError:
        # The C decoder gives up on very deep nesting; the text may still be valid JSON
        # (then it is not a command) or not (then it is a parse error).
        return _MALFORMED if is_valid_json(text) else _PARSE_ERROR
    return validate(obj, text)


def parse_line_stdlib(line: bytes) -> LineEvent:
    """``parse_line`` without the fast path: decode, strip, stdlib JSON, validate."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _DECODE_ERROR
    return parse_text_stdlib(text)


class _SendSchema(
    msgspec.Struct, tag_field="command", tag="send", forbid_unknown_fields=True, gc=False
):
    """A canonical ``send`` command, for the msgspec fast path.

    Tagged, in a union (a lone tagged struct would accept a missing tag, which the
    contract calls malformed; in a union the tag is required).
    """

    topic: str
    msg: str
    delivery: Delivery
    cache: bool = True


class _OtherCommand(msgspec.Struct, tag_field="command", gc=False):
    """Any other command: recognised (all else skipped) so that msgspec returns it
    instead of raising, since the exception measured 0.6 to 1 us; it goes the stdlib way.
    """


class _Subscribe(_OtherCommand, tag="subscribe"):
    pass


class _Unsubscribe(_OtherCommand, tag="unsubscribe"):
    pass


# For a 130-byte send the union measured 0.02 us slower than a struct with a required
# Literal "command"; it spares each subscribe the exception (0.9 us), so a subscribe costs
# about 0.3 us more than with the stdlib path alone, not 1 us. ("command" may come
# anywhere in the object: msgspec looks ahead for the tag.)
_decode_command = msgspec.json.Decoder(_SendSchema | _Subscribe | _Unsubscribe).decode


# What may surround an object msgspec accepted: JSON whitespace only (str.strip in the
# stdlib path strips more, but msgspec rejects anything else, which then goes that way).
_JSON_WS = b" \t\n\r"
_JSON_WS_STR = " \t\n\r"


def parse_line(line: bytes) -> LineEvent:
    """Parse one line without its ``\\n``: decode, strip, JSON, validate.

    A well-formed ``send`` is decoded and validated by msgspec in one C call (about 4x
    faster than the stdlib path). msgspec only accepts what the stdlib path turns into
    the identical Send (tests/test_protocol_fastpath.py checks this differentially);
    anything it rejects, for whatever reason, takes the stdlib path for its exact answer.
    """
    try:
        s = _decode_command(line)
    except Exception:
        return parse_line_stdlib(line)
    if type(s) is _SendSchema:
        return Send(s.topic, s.msg, s.delivery, s.cache, line.strip(_JSON_WS))
    return parse_line_stdlib(line)


def parse_text(text: str) -> LineEvent:
    """Parse one already-decoded command (used by message transports such as WebSocket)."""
    try:
        s = _decode_command(text)
    except Exception:
        return parse_text_stdlib(text)
    if type(s) is _SendSchema:
        # Accepted text encodes: msgspec itself had to encode it to UTF-8.
        return Send(s.topic, s.msg, s.delivery, s.cache, text.strip(_JSON_WS_STR).encode())
    return parse_text_stdlib(text)


# A non-recursive JSON well-formedness check, only for input too deep for json.loads.
_TOKEN = re.compile(
    r"""[ \t\n\r]*(?:
        (?P<open>[\[{]) | (?P<close>[\]}]) | (?P<comma>,) | (?P<colon>:) |
        (?P<string>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*") |
        (?P<scalar>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null
                   |NaN|Infinity|-Infinity)
    )""",
    re.VERBOSE,
)


def is_valid_json(text: str) -> bool:
    """Whether ``text`` is one JSON value, checked with an explicit stack (no recursion)."""
    stack: list[str] = []  # "[" or "{" for each open container
    expect = "value"  # value | value_or_close | comma_or_close | key | key_or_close | colon
    pos, end = 0, len(text)
    done = False
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            return done and text[pos:].strip(" \t\n\r") == ""
        if done:
            return False
        pos = m.end()
        kind = m.lastgroup
        if expect in ("value", "value_or_close"):
            if kind == "close" and expect == "value_or_close" and m["close"] == "]":
                stack.pop()
            elif kind == "open":
                stack.append(m["open"])
                expect = "value_or_close" if m["open"] == "[" else "key_or_close"
                continue
            elif kind not in ("string", "scalar"):
                return False
        elif expect in ("key", "key_or_close"):
            if kind == "string":
                expect = "colon"
                continue
            if kind == "close" and expect == "key_or_close" and m["close"] == "}":
                stack.pop()
            else:
                return False
        elif expect == "colon":
            if kind != "colon":
                return False
            expect = "value"
            continue
        else:  # comma_or_close
            if kind == "comma":
                expect = "value" if stack[-1] == "[" else "key"
                continue
            if kind != "close" or m["close"] != ("]" if stack[-1] == "[" else "}"):
                return False
            stack.pop()
        # a value (scalar, string or closed container) just completed
        if not stack:
            done = True
            if pos >= end:
                return True
        else:
            expect = "comma_or_close"


# --- encoding -----------------------------------------------------------------------
# Outbox items are single JSON objects without a terminator; the TCP transport adds
# "\r\n", the WebSocket transport sends each as one message.

SUCCESS = b'{"success": true}'


def encode_failure(reason: str) -> bytes:
    return json.dumps({"success": False, "reason": reason}).encode()


_FAILURES = {
    r: encode_failure(r)
    for r in (DECODE_ERROR, PARSE_ERROR, MALFORMED, INTERNAL_ERROR, LINE_TOO_LONG)
}


def failure_bytes(reason: str) -> bytes:
    encoded = _FAILURES.get(reason)
    return encoded if encoded is not None else encode_failure(reason)


def splice_index(raw: bytes, index: int) -> bytes:
    """The delivery of a received send: its ``raw`` bytes with ``"index": index`` added.

    raw is a stripped JSON object with at least the send keys, so it ends in "}".
    """
    return b'%b, "index": %d}' % (raw[:-1], index)


def encode_delivery(send: Send, index: int) -> bytes:
    """The delivered object: the command exactly as received, plus ``"index"``."""
    raw = send.raw
    if raw:
        return b'%b, "index": %d}' % (raw[:-1], index)  # splice_index, inlined (hot)
    obj: dict[str, object] = {
        "command": "send",
        "topic": send.topic,
        "msg": send.msg,
        "delivery": send.delivery,
    }
    if not send.cache:
        obj["cache"] = False
    obj["index"] = index
    return json.dumps(obj).encode()


# --- framing ------------------------------------------------------------------------


@attrs.define
class LineBuffer:
    """Splits a byte stream into lines at ``\\n`` and enforces the line limit.

    ``feed`` returns the complete lines of everything received so far; a partial line
    waits for more data. ``too_long`` turns true once the pending partial line (or a
    complete one) exceeds ``max_line_bytes``: the caller replies ``Line too long`` and
    closes.
    """

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    # A bytearray, and only new data is searched for "\n": a long line arriving in many
    # small segments costs O(its length), not O(length squared) in copies and scans.
    # None while there is no partial line: no object per idle connection.
    _partial: bytearray | None = None
    too_long: bool = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        limit = self.max_line_bytes
        partial = self._partial
        if b"\n" not in data:
            if partial is None:
                partial = self._partial = bytearray(data)
            else:
                partial += data
            if len(partial) > limit:
                self.too_long = True
                self._partial = None
            return []
        if partial is not None:
            partial += data
            data = bytes(partial)
            self._partial = None
        elif type(data) is not bytes:
            data = bytes(data)  # trio streams may hand out a bytearray
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            if len(tail) > limit:
                self.too_long = True
            else:
                self._partial = bytearray(tail)
        if len(data) > limit:  # only then can a complete line be over the limit
            for i, line in enumerate(lines):
                if len(line) > limit:
                    self.too_long = True
                    self._partial = None
                    return lines[:i]
        return lines

    @property
    def pending(self) -> bytes:
        """The incomplete line kept until its newline (or EOF) arrives."""
        return b"" if self._partial is None else bytes(self._partial)
