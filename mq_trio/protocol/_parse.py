"""Parsing: one line (bytes, or WebSocket text) in, one command or failure out.

Every rule of the wire contract is tested by feeding bytes (the h11/wsproto approach).
"""

from __future__ import annotations

import decimal
import json
import re
from collections.abc import Callable

import msgspec

from ._commands import (
    _DECODE_ERROR,
    _MALFORMED,
    _PARSE_ERROR,
    QUIT,
    Delivery,
    LineEvent,
    Send,
    validate,
)


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

    Every input goes this way unless the msgspec fast path (``parse_line``) accepts it.
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

