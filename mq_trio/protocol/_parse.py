"""Parsing: one line (bytes, or WebSocket text) in, one command or failure out.

Every rule of the wire contract is tested by feeding bytes (the h11/wsproto approach).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import msgspec

from ._commands import (
    _DECODE_ERROR,
    _MALFORMED,
    _PARSE_ERROR,
    MAX_ID_CHARS,
    QUIT,
    Ack,
    Delivery,
    LineEvent,
    Nack,
    Progress,
    Send,
    SendEx,
    validate,
)

UNSET = msgspec.UNSET

# --- the reference path, bounded ------------------------------------------------------
#
# Only a flat object (no nested array or object) of the command keys can be a command, and
# a command holds no integer outside 64 bits and no duplicate key. The stdlib scanner,
# which builds Python objects (20 to 90 ms for a 1 MiB line of many small values) and
# converts integers in quadratic time (42 s for 1 MiB of digits), only ever sees such an
# object with at most 40 members, checked first in C by msgspec (which neither converts a
# long integer nor builds anything beyond the ten keys). Anything else is not a command:
# it is only checked for being JSON, by msgspec without building anything, and answered
# ``Malformed json message`` (valid) or ``Could not parse json`` (not). Every line costs a
# few linear passes in C (bench/parse_worst.py).

_Scalar = str | int | bool | None


class _Flat(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A flat object of the command keys with scalar values: what may be a command.

    msgspec refuses an integer outside [-2**63, 2**64 - 1] without converting it.
    """

    command: _Scalar = None
    topic: _Scalar = None
    msg: _Scalar = None
    delivery: _Scalar = None
    cache: _Scalar = None
    last_seen: _Scalar = None
    epoch: _Scalar = None
    token: _Scalar = None
    user: _Scalar = None
    password: _Scalar = None
    ack: _Scalar = None
    id: _Scalar = None
    prefetch: _Scalar = None
    index: _Scalar = None
    delay: float | int | str | bool | None = None


#: The keys of ``_Flat``: a flat object with more members than this repeats one.
_FLAT_KEYS = 15


class _BatchShape(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A ``batch``: the one command with a nested value, an array of strings."""

    command: _Scalar = None
    topic: _Scalar = None
    msgs: Annotated[list[str], msgspec.Meta(max_length=10_000)] = []
    delivery: _Scalar = None
    cache: _Scalar = None
    ack: _Scalar = None
    id: _Scalar = None


_decode_flat = msgspec.json.Decoder(_Flat).decode
_decode_batch = msgspec.json.Decoder(_BatchShape).decode
_validate_json = msgspec.json.Decoder(msgspec.Raw).decode

_scan_once: Callable[[str, int], tuple[object, int]]
_scan_once = json.JSONDecoder(  # type: ignore[attr-defined]
    object_pairs_hook=lambda pairs: pairs
).scan_once


def _loads_pairs(text: str) -> object:
    """The stdlib C scanner on ``text`` (already stripped), objects as lists of pairs.

    json.loads -> decode -> raw_decode plus two whitespace regex matches were a visible
    share of the profile; the C scanner they end in is called directly here.
    """
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


def _unsurrogate(data: bytes) -> bytes:
    """``data`` with every escaped surrogate made another escape of the same validity.

    Python's json reads escaped lone surrogates, msgspec does not; for msgspec's checks
    only, ``\\uD800`` becomes ``\\u0800`` (an escaped backslash before "uD800" stays that).
    """
    return data.replace(b"\\ud", b"\\u0").replace(b"\\uD", b"\\u0")


def _is_json(data: bytes) -> bool:
    """Whether ``data`` is one JSON value as Python's json reads it, checked by msgspec.

    What only Python's json reads (NaN, Infinity, -Infinity, escaped lone surrogates) is
    replaced by what msgspec reads and is valid exactly where they are: " 0 " for a literal
    (inside a string it stays a string; next to a number or name it stays invalid), another
    escape for a surrogate. Nesting deeper than msgspec follows (Python's recursion limit,
    about 1000 levels less the caller's stack) counts as invalid.
    """
    try:
        _validate_json(data)
    except RecursionError:
        return False
    except msgspec.DecodeError as exc:
        # Each test first looks for one byte (memchr): a multi-byte search of a line of
        # bytes that recur in the pattern ("aaa..." for "NaN") takes a step per byte, 3 ms
        # a MiB; an unfinished 1 MiB line at EOF paid that on every close.
        if b"\\" not in data and str(exc).startswith("Input data was truncated"):
            # msgspec read every byte without a complaint and wanted more: nothing only
            # Python's json reads (it reports a surrogate escape as truncation) can
            # complete the value.
            return False
        if b"N" in data and b"NaN" in data:
            data = data.replace(b"NaN", b" 0 ")
        if b"y" in data and b"Infinity" in data:
            data = data.replace(b"-Infinity", b" 0 ").replace(b"Infinity", b" 0 ")
        if b"\\" in data and b"\\u" in data:
            data = _unsurrogate(data)
        try:
            _validate_json(data)
        except (msgspec.DecodeError, RecursionError):
            return False
    return True


def _is_flat(data: bytes) -> bool:
    """Whether ``data`` is an object of the command keys with scalar values (msgspec)."""
    if data[:1] != b"{":
        return False
    try:
        _decode_flat(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _is_batch(data: bytes) -> bool:
    """Whether ``data`` has the shape of a ``batch`` (scalars, and ``msgs`` an array of
    at most 10,000 strings), checked by msgspec without converting anything big."""
    if data[:1] != b"{" or b'"msgs"' not in data:
        return False
    try:
        _decode_batch(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def parse_text_stdlib(text: str) -> LineEvent:
    """Parse one decoded command with the stdlib json scanner: the reference behaviour.

    Every input goes this way unless the msgspec fast path (``parse_line``) accepts it.
    """
    text = text.strip()
    if not text:
        return None
    if text == "quit":
        return QUIT
    # "replace": only a str given to parse_text_stdlib can hold lone surrogate characters,
    # which no UTF-8 encodes; "?" instead is as valid as they are, in a string or not.
    data = text.encode("utf-8", "replace")
    batch = False
    if not _is_flat(data) and not (
        b"\\" in data and b"\\u" in data and _is_flat(_unsurrogate(data))
    ):
        batch = _is_batch(data) or (
            b"\\" in data and b"\\u" in data and _is_batch(_unsurrogate(data))
        )
        if not batch:
            return _MALFORMED if _is_json(data) else _PARSE_ERROR
    # Every member's key opens with a quote that no backslash precedes, and so does at most
    # every member's string value: more such quotes than four per key name means more
    # members than names: a duplicate key, refused without building the pairs.
    quotes = data.count(b'"')
    limit = 4 * _FLAT_KEYS
    if not batch and quotes > limit and quotes - data.count(b'\\"') > limit:
        return _MALFORMED
    try:
        pairs = _loads_pairs(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _PARSE_ERROR
    assert type(pairs) is list
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Duplicate keys: the command would route by the last, and a client reading the
        # delivered bytes may take the first; refused (docs/protocol.md, extensions).
        return _MALFORMED
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
    #: UNSET when absent (true): the extensions' duplicate check counts members exactly.
    cache: bool | msgspec.UnsetType = msgspec.UNSET
    #: The work-queue extensions (a job, a message id): UNSET when absent, so that the
    #: duplicate-key check knows exactly how many members the line has.
    ack: bool | msgspec.UnsetType = msgspec.UNSET
    id: str | msgspec.UnsetType = msgspec.UNSET


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
_decode_command = msgspec.json.Decoder(
    _SendSchema | _Subscribe | _Unsubscribe | Ack | Nack | Progress
).decode


# What may surround an object msgspec accepted: JSON whitespace only (str.strip in the
# stdlib path strips more, but msgspec rejects anything else, which then goes that way).
_JSON_WS = b" \t\n\r"
# The shortest send (four members, empty topic and msg) plus the shortest member:
# ',"msg":""'. Every character of a decoded string takes at least a byte of the line.
_ROOM_FOR_A_MEMBER = len(b'{"command":"send","topic":"","msg":"","delivery":"all"}') + len(
    b',"msg":""'
)


def _duplicate(line: bytes) -> bool:
    """Whether a line msgspec decoded as a ``_SendSchema`` has a duplicate key.

    Its members are send keys, with string values but for "cache": 4 quotes each, 2 for
    "cache". So at most 18 quotes that are not escaped (escaped: \\", counted exactly when
    no \\\\ precedes a quote) means no duplicate: 16 or 18. When unsure, True: the
    stdlib path decides.
    """
    quotes = line.count(b'"')
    return quotes > 18 and (b"\\\\" in line or quotes - line.count(b'\\"') > 18)


def parse_line(line: bytes) -> LineEvent:
    """Parse one line without its ``\\n``: decode, strip, JSON, validate.

    A well-formed ``send`` is decoded and validated by msgspec in one C call (about 4x
    faster than the stdlib path). msgspec only accepts what the stdlib path turns into
    the identical Send (tests/test_protocol_fastpath.py checks this differentially);
    anything it rejects, for whatever reason, takes the stdlib path for its exact answer,
    and so does a send that may hold a duplicate key (refused there).
    """
    try:
        s = _decode_command(line)
    except Exception:
        return parse_line_stdlib(line)
    cls = type(s)
    if cls is _SendSchema:
        # msgspec keeps the last of duplicate keys while the delivered bytes (raw) keep
        # them all: a duplicate is refused (the stdlib path tells). A line too short to
        # hold one member more than the four required has none (json.dumps' own spacing
        # fits: 7 bytes); this costs 0.05 us where counting quotes costs 0.15 us.
        topic = s.topic
        msg = s.msg
        if s.ack is UNSET and s.id is UNSET:
            if len(line) - len(topic) - len(msg) >= _ROOM_FOR_A_MEMBER and _duplicate(line):
                return parse_line_stdlib(line)
            return Send(topic, msg, s.delivery, s.cache is not False,
                        line.strip(_JSON_WS))
        return _send_ex(s, line)
    if cls is Ack or cls is Progress or cls is Nack:
        # A line with a fourth member is at least 47 bytes longer than its topic and
        # last index (the shortest: '{"command":"ack","topic":"","index":0,"index":0}'),
        # so a shorter one has no duplicate; else count its quotes: 10 outside the
        # topic's string (12 with a delay).
        if cls is Nack or len(line) - len(s.topic) - len(str(s.index)) > 46:
            quotes = 10 if cls is not Nack or s.delay is UNSET else 12
            if _more_quotes(line, quotes):
                return parse_line_stdlib(line)
        return s  # type: ignore[no-any-return]  # the command itself, checked by its schema
    return parse_line_stdlib(line)


def _more_quotes(line: bytes, structural: int) -> bool:
    """Whether ``line`` may have more members than msgspec saw (a duplicate key): more
    than ``structural`` quotes that no backslash escapes (when unsure, True: the stdlib
    path decides)."""
    quotes = line.count(b'"')
    return quotes > structural and (b"\\\\" in line
                                    or quotes - line.count(b'\\"') > structural)


def _send_ex(s: _SendSchema, line: bytes) -> LineEvent:
    """A job or a send with an id, decoded by msgspec: checked as ``validate_send_ex``
    would (anything unusual takes the stdlib path for its exact answer)."""
    ack = s.ack is True
    message_id = None if s.id is UNSET else s.id
    if (ack and s.delivery != "one") or (
        message_id is not None and not 1 <= len(message_id) <= MAX_ID_CHARS
    ):
        return parse_line_stdlib(line)
    # Members: the four required strings (16 quotes), and "cache", "ack" (2), "id" (4).
    raw = line.strip(_JSON_WS)
    structural = (16 + 2 * (s.ack is not UNSET) + 4 * (message_id is not None)
                  + 2 * (s.cache is not UNSET))
    if _more_quotes(raw, structural):
        return parse_line_stdlib(line)
    return SendEx(s.topic, s.msg, s.delivery, s.cache is not False, raw, ack, message_id)
