"""Issue #11, points 2 and 11a: no line stalls the parser; duplicate keys are refused.

Both parsing paths: ``parse_line`` (msgspec first) and ``parse_line_stdlib`` (the
reference). Behaviour only, never time: the cost figures are bench/parse_worst.py's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator

import pytest
from support import LineClient

from mq_trio import protocol
from mq_trio.protocol import (
    Failure,
    LineEvent,
    Send,
    Subscribe,
    _parse,
    encode_send,
    parse_line,
    parse_line_stdlib,
    parse_text_stdlib,
)
from mq_trio.protocol._commands import INT_MAX, INT_MIN

PARSE = Failure("Could not parse json")
MALFORMED = Failure("Malformed json message")

Parser = Callable[[bytes], LineEvent]
PATHS = pytest.mark.parametrize(
    "parse", [parse_line, parse_line_stdlib], ids=["parse_line", "stdlib"]
)

SUB = b'{"command": "subscribe", "topic": "t", "last_seen": '
SEND_HEAD = b'{"command": "send", "topic": "t", "delivery": "all", "msg": '


@pytest.fixture
def scanner_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The texts given to the stdlib scanner (which converts every integer it reads)."""
    calls: list[str] = []
    real = _parse._scan_once

    def spy(text: str, index: int) -> tuple[object, int]:
        calls.append(text)
        return real(text, index)

    monkeypatch.setattr(_parse, "_scan_once", spy)
    yield calls


# --- integers: 64 bits at most, refused before conversion ------------------------------


def test_the_bounds_are_64_bit_signed() -> None:
    assert (INT_MIN, INT_MAX) == (-(2**63), 2**63 - 1)


@PATHS
@pytest.mark.parametrize("value", [INT_MIN, -1, 0, INT_MAX])
def test_last_seen_within_64_bits_is_accepted(parse: Parser, value: int) -> None:
    assert parse(SUB + str(value).encode() + b"}") == Subscribe("t", value)


@PATHS
@pytest.mark.parametrize(
    "digits",
    [str(2**63), str(-(2**63) - 1), str(2**64), "1" + "0" * 30, "9" * 5000, "9" * 300_000,
     "-" + "9" * 300_000],
    ids=["2**63", "-2**63-1", "2**64", "10**30", "5000 digits", "300k digits", "-300k digits"],
)
def test_last_seen_beyond_64_bits_is_malformed(parse: Parser, digits: str) -> None:
    assert parse(SUB + digits.encode() + b"}") == MALFORMED


@PATHS
def test_a_huge_integer_is_never_given_to_the_converting_scanner(
    parse: Parser, scanner_calls: list[str]
) -> None:
    big = b"9" * 300_000
    assert parse(SUB + big + b"}") == MALFORMED
    assert parse(SEND_HEAD + big + b"}") == MALFORMED
    assert parse(big) == MALFORMED
    assert parse(b"[" + big + b"]") == MALFORMED
    assert parse(b'{"a": [' + big + b"]}") == MALFORMED
    assert scanner_calls == []
    # and still: invalid JSON holding one is a parse error
    assert parse(b"[" + big) == PARSE
    assert parse(SUB + big) == PARSE
    assert parse(SUB + big + b"}}") == PARSE
    assert scanner_calls == []


@PATHS
def test_a_line_of_many_values_is_classified_without_the_scanner(
    parse: Parser, scanner_calls: list[str]
) -> None:
    n = 100_000
    assert parse(b"[" + b"1," * n + b"1]") == MALFORMED
    assert parse(b"[" + b"1.5e300," * n + b"1]") == MALFORMED
    assert parse(b"[" + b"[]," * n + b"[]]") == MALFORMED
    assert parse(b"{" + b'"k": 1, ' * n + b'"k": 1}') == MALFORMED
    assert parse(b"[" + b"1," * n + b"1,]") == PARSE
    assert scanner_calls == []


# --- nesting ---------------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("depth", [2, 64, 500])
def test_nesting_within_the_bound_is_classified(parse: Parser, depth: int) -> None:
    assert parse(b"[" * depth + b"]" * depth) == MALFORMED
    assert parse(b'{"a":' * depth + b"1" + b"}" * depth) == MALFORMED
    assert parse(SEND_HEAD + b"[" * depth + b"]" * depth + b"}") == MALFORMED
    assert parse(b"[" * depth + b"]" * (depth - 1)) == PARSE


@PATHS
def test_nesting_beyond_the_bound_is_refused_unread(
    parse: Parser, scanner_calls: list[str]
) -> None:
    depth = 100_000  # beyond any recursion limit msgspec follows
    assert parse(b"[" * depth + b"]" * depth) == PARSE
    assert parse(b'{"a":' * depth + b"1" + b"}" * depth) == PARSE
    assert parse(SEND_HEAD + b"[" * depth + b"]" * depth + b"}") == PARSE
    assert parse(b"[" * depth) == PARSE
    assert scanner_calls == []


# --- what only Python's json reads keeps its answer --------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "NaN", "[NaN]", "[Infinity, -Infinity]", '{"a": NaN}', '"NaN"', '["\\ud800"]',
        '["\\udc00\\ud800"]', '["\\\\ud800"]', '[NaN1]', "[-NaN]", "[--Infinity]",
        "[Infinityx]", "[1NaN]", '["\\ud800]', "[NaN,]", '{"NaN": NaN}', "[\"\\u00e9\", 1e999]",
    ],
)
def test_stdlib_only_json_keeps_its_classification(text: str) -> None:
    try:
        json.loads(text)
    except ValueError:
        expected = PARSE
    else:
        expected = MALFORMED
    data = text.encode()
    assert parse_line(data) == parse_line_stdlib(data) == parse_text_stdlib(text) == expected


@PATHS
def test_lone_surrogate_escapes_still_make_commands(parse: Parser) -> None:
    line = b'{"command": "send", "topic": "\\ud800", "msg": "\\udc00x", "delivery": "all"}'
    assert parse(line) == Send("\ud800", "\udc00x", "all")
    sub = b'{"command": "subscribe", "topic": "\\uDBFF", "last_seen": 3}'
    assert parse(sub) == Subscribe("\udbff", 3)
    assert parse(b'{"command": "subscribe", "topic": "t", "last_seen": NaN}') == MALFORMED


def test_lone_surrogate_characters_in_text_still_make_commands() -> None:
    text = '{"command": "subscribe", "topic": "\ud800"}'
    assert parse_text_stdlib(text) == Subscribe("\ud800")
    assert parse_text_stdlib("[\ud800]") == PARSE


# --- duplicate keys ------------------------------------------------------------------------


DUPLICATES = [
    b'{"command": "send", "topic": "a", "topic": "b", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "a", "msg": "m", "delivery": "all", "\\u0074opic": "b"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "cache": true, '
    b'"cache": true}',
    b'{"command": "send", "command": "send", "topic": "t", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "m", "msg": "n", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "\\"q\\"", "delivery": "one", '
    b'"delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "\\\\", "delivery": "all", "msg": "\\\\"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"'
    + b', "cache": true' * 1000 + b"}",
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"'
    + b', "topic": "\\\\"' * 1000 + b"}",
    b'{"command": "subscribe", "topic": "a", "topic": "b"}',
    b'{"command": "subscribe", "topic": "t", "last_seen": 1, "last_seen": 2}',
    b'{"command": "unsubscribe", "topic": "a", "topic": "b"}',
    b'{"command": "subscribe", "command": "send", "topic": "t", "msg": "m", '
    b'"delivery": "all"}',
]


@PATHS
@pytest.mark.parametrize("line", DUPLICATES)
def test_duplicate_keys_are_malformed(parse: Parser, line: bytes) -> None:
    assert parse(line) == MALFORMED


@PATHS
@pytest.mark.parametrize(
    "msg",
    ['"q"', '\\"', "\\", '\\\\"', '{"a": "b", "c": ["d", "e", "f"], "g": "h", "i": "j"}' * 3],
)
def test_escaped_quotes_are_not_taken_for_duplicates(parse: Parser, msg: str) -> None:
    for cache in (True, False):
        line = encode_send("t", msg, "one", cache)
        event = parse(line)
        assert event == Send("t", msg, "one", cache)
        assert isinstance(event, Send) and event.raw == line


def test_the_delivery_topic_is_the_routing_topic_for_any_first_key_reader() -> None:
    # Before: routed by the last "topic", delivered with both; a reader taking the first
    # key saw another topic. Now: refused, so no delivery disagrees with its routing.
    line = b'{"command": "send", "topic": "a", "msg": "m", "delivery": "all", "topic": "b"}'
    for parse in (parse_line, parse_line_stdlib):
        event = parse(line)
        if isinstance(event, Send):
            first = json.loads(
                protocol.encode_delivery(event, 0), object_pairs_hook=lambda p: p[1]
            )
            assert first == ("topic", event.topic)
        assert event == MALFORMED


async def test_a_duplicate_key_send_reaches_nobody(
    connect: Callable[[], Awaitable[LineClient]],
) -> None:
    a, b, pub = await connect(), await connect(), await connect()
    assert await a.request({"command": "subscribe", "topic": "a"}) == {"success": True}
    assert await b.request({"command": "subscribe", "topic": "b"}) == {"success": True}
    await pub.send_raw(
        b'{"command": "send", "topic": "a", "msg": "dup", "delivery": "all", "topic": "b"}\n'
    )
    assert await pub.receive() == {"success": False, "reason": "Malformed json message"}
    for topic, client in (("a", a), ("b", b)):
        assert await pub.request(
            {"command": "send", "topic": topic, "msg": "ok", "delivery": "all"}
        ) == {"success": True}
        # the first thing each subscriber gets is the valid send, not the duplicate one
        got = await client.receive()
        assert (got["topic"], got["msg"], got["index"]) == (topic, "ok", 0)
