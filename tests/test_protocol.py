"""Unit tests of the sans-IO protocol module: PROTOCOL.md sections 1-3, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mq_trio import protocol
from mq_trio.protocol import (
    QUIT,
    Failure,
    LineBuffer,
    Send,
    Subscribe,
    Unsubscribe,
    _parse,
    encode_delivery,
    failure_bytes,
    parse_line,
    parse_line_stdlib,
)

DECODE = Failure("Could not decode input as UTF-8")
PARSE = Failure("Could not parse json")
MALFORMED = Failure("Malformed json message")


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


SEND = {"command": "send", "topic": "t", "msg": "m", "delivery": "all"}
SUB = {"command": "subscribe", "topic": "t"}
UNSUB = {"command": "unsubscribe", "topic": "t"}


# --- section 2: the exact reply texts ----------------------------------------------


def test_reason_texts_are_exact() -> None:
    assert protocol.DECODE_ERROR == "Could not decode input as UTF-8"
    assert protocol.PARSE_ERROR == "Could not parse json"
    assert protocol.MALFORMED == "Malformed json message"
    assert protocol.INTERNAL_ERROR == "Internal exception"
    assert protocol.LINE_TOO_LONG == "Line too long"


@pytest.mark.parametrize(
    "reason",
    [
        "Could not decode input as UTF-8",
        "Could not parse json",
        "Malformed json message",
        "Internal exception",
        "Line too long",
    ],
)
def test_failure_bytes(reason: str) -> None:
    assert json.loads(failure_bytes(reason)) == {"success": False, "reason": reason}
    assert b"\n" not in failure_bytes(reason)


def test_success_bytes() -> None:
    assert json.loads(protocol.SUCCESS) == {"success": True}
    assert b"\n" not in protocol.SUCCESS


# --- section 1: decoding, stripping, blank lines, quit ------------------------------


def test_valid_commands() -> None:
    assert parse_line(line(SEND)) == Send("t", "m", "all", True)
    assert parse_line(line(SUB)) == Subscribe("t", -1, True)
    assert parse_line(line(UNSUB)) == Unsubscribe("t")
    assert parse_line(line({**SUB, "last_seen": 5, "cache": False})) == Subscribe("t", 5, False)
    assert parse_line(line({**SEND, "delivery": "one", "cache": False})) == Send(
        "t", "m", "one", False
    )


@pytest.mark.parametrize(
    "raw",
    [
        line(SUB) + b"\r",
        b"  " + line(SUB) + b"  \t\r",
        b"\t\t" + line(SUB),
        b"\x0b\x0c " + line(SUB) + b" \x0c",
    ],
)
def test_surrounding_whitespace_and_cr_are_stripped(raw: bytes) -> None:
    assert parse_line(raw) == Subscribe("t")


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r", b"\t \r", b" \x0b\x0c "])
def test_blank_lines_are_ignored(raw: bytes) -> None:
    assert parse_line(raw) is None


@pytest.mark.parametrize("raw", [b"quit", b"quit\r", b"  quit  ", b"\tquit\r"])
def test_quit(raw: bytes) -> None:
    assert parse_line(raw) is QUIT


@pytest.mark.parametrize("raw", [b"QUIT", b"quit now", b'"quit"', b"quitt", b"qu it"])
def test_not_quit(raw: bytes) -> None:
    assert parse_line(raw) == (MALFORMED if raw == b'"quit"' else PARSE)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b"\xc3",  # truncated sequence
        b'{"command": "subscribe", "topic": "\xe9"}',  # latin-1, not UTF-8
        b"\xed\xa0\x80",  # an encoded surrogate is not valid UTF-8
        b"\xc0\xaf",  # overlong
        line(SUB) + b"\x80",
        b"quit\xff",
    ],
)
def test_invalid_utf8(raw: bytes) -> None:
    assert parse_line(raw) == DECODE


def test_non_ascii_utf8_is_fine() -> None:
    raw = '{"command": "subscribe", "topic": "thé ☃ 🎉"}'.encode()
    assert parse_line(raw) == Subscribe("thé ☃ 🎉")
    # "surrounding whitespace" is Unicode whitespace once decoded (as str.strip has it)
    assert parse_line("\u00a0quit\u2003".encode()) is QUIT


# --- JSON well-formedness -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"}",
        b"hello",
        b"{'command': 'subscribe', 'topic': 't'}",
        b'{"command": "subscribe", "topic": "t",}',
        b'{"command": "subscribe" "topic": "t"}',
        b'{"command": "subscribe", "topic": "t"} {}',
        b'{"command": "subscribe", "topic": "t"}}',
        b'{"command": "subscribe", "topic": t}',
        b'{"command": "subscribe", "topic": "t\x01"}',  # raw control character
        b"[1, 2",
        b"tru",
        b"01",
        b"\x00",
        b'"unterminated',
    ],
)
def test_invalid_json(raw: bytes) -> None:
    assert parse_line(raw) == PARSE


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"[1, 2]", b'"subscribe"', b"0", b"-1.5", b"1e9", b"null", b"true", b"false", b"{}",
     b'[{"command": "subscribe", "topic": "t"}]'],
)
def test_json_that_is_not_an_object_is_malformed(raw: bytes) -> None:
    assert parse_line(raw) == MALFORMED


# --- section 3: validation ----------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {"topic": "t"},  # missing command
        {"command": "publish", "topic": "t"},  # unknown command
        {"command": "Subscribe", "topic": "t"},  # case matters
        {"command": "", "topic": "t"},
        {"command": 1, "topic": "t"},
        {"command": None, "topic": "t"},
        {"command": True, "topic": "t"},
        {"command": ["subscribe"], "topic": "t"},
        {"command": {"subscribe": 1}, "topic": "t"},
        {"command": "quit"},
    ],
)
def test_bad_command_field(obj: dict[str, Any]) -> None:
    assert parse_line(line(obj)) == MALFORMED


@pytest.mark.parametrize(
    "obj",
    [
        {"command": "subscribe"},
        {"command": "subscribe", "last_seen": 1},
        {"command": "unsubscribe"},
        {"command": "send", "msg": "m", "delivery": "all"},
        {"command": "send", "topic": "t", "delivery": "all"},
        {"command": "send", "topic": "t", "msg": "m"},
        {"command": "send"},
    ],
)
def test_missing_required_key(obj: dict[str, Any]) -> None:
    assert parse_line(line(obj)) == MALFORMED


@pytest.mark.parametrize(
    "obj",
    [
        {**SUB, "msg": "m"},
        {**SUB, "delivery": "all"},
        {**SUB, "index": 1},
        {**SUB, "extra": None},
        {**UNSUB, "cache": True},
        {**UNSUB, "last_seen": 1},
        {**UNSUB, "msg": "m"},
        {**SEND, "last_seen": 1},
        {**SEND, "index": 0},
        {**SEND, "Topic": "t"},
        {**SEND, "": ""},
    ],
)
def test_extra_key(obj: dict[str, Any]) -> None:
    assert parse_line(line(obj)) == MALFORMED


WRONG_STRINGS: list[Any] = [1, 1.5, True, False, None, [], ["t"], {}, {"a": "b"}]
WRONG_INTS: list[Any] = [True, False, 1.0, 1.5, -1.0, "1", None, [], {}, [1]]
WRONG_BOOLS: list[Any] = [1, 0, "true", "false", None, 1.0, [], {}, [True]]


@pytest.mark.parametrize("value", WRONG_STRINGS)
@pytest.mark.parametrize("base", [SUB, UNSUB, SEND], ids=["subscribe", "unsubscribe", "send"])
def test_topic_must_be_a_string(base: dict[str, Any], value: Any) -> None:
    assert parse_line(line({**base, "topic": value})) == MALFORMED


@pytest.mark.parametrize("value", WRONG_STRINGS)
def test_msg_must_be_a_string(value: Any) -> None:
    assert parse_line(line({**SEND, "msg": value})) == MALFORMED


@pytest.mark.parametrize(
    "value", ["ALL", "One", "any", "", " all", "all ", 1, True, None, ["all"], {"all": 1}]
)
def test_delivery_must_be_all_or_one(value: Any) -> None:
    assert parse_line(line({**SEND, "delivery": value})) == MALFORMED


@pytest.mark.parametrize("value", WRONG_INTS)
def test_last_seen_must_be_an_integer(value: Any) -> None:
    # booleans are not integers; floats (even integral ones) are not integers
    assert parse_line(line({**SUB, "last_seen": value})) == MALFORMED


@pytest.mark.parametrize("value", WRONG_BOOLS)
@pytest.mark.parametrize("base", [SUB, SEND], ids=["subscribe", "send"])
def test_cache_must_be_a_boolean(base: dict[str, Any], value: Any) -> None:
    # integers are not booleans
    assert parse_line(line({**base, "cache": value})) == MALFORMED


@pytest.mark.parametrize("raw", [b"1.0", b"1e2", b"-0.0", b"1E0", b"NaN", b"Infinity"])
def test_last_seen_float_spellings(raw: bytes) -> None:
    # NaN/Infinity are not RFC 8259 JSON, but Python's json (and so the family's asyncio
    # server) reads them as floats: either answer is defensible, a success is not.
    assert parse_line(b'{"command": "subscribe", "topic": "t", "last_seen": ' + raw + b"}") in (
        MALFORMED,
        PARSE,
    )
    if raw[:1].isdigit() or raw[:1] == b"-":
        assert (
            parse_line(b'{"command": "subscribe", "topic": "t", "last_seen": ' + raw + b"}")
            == MALFORMED
        )


@pytest.mark.parametrize("value", [-1, 0, 1, -100, 2**63 - 1, -(2**63)])
def test_last_seen_any_64_bit_integer(value: int) -> None:
    assert parse_line(line({**SUB, "last_seen": value})) == Subscribe("t", value)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_last_seen_beyond_64_bits_is_malformed(value: int) -> None:
    # docs/protocol.md, extensions: refused before conversion (quadratic in Python)
    assert parse_line(line({**SUB, "last_seen": value})) == MALFORMED
    assert parse_line_stdlib(line({**SUB, "last_seen": value})) == MALFORMED


def test_last_seen_with_thousands_of_digits_is_malformed() -> None:
    # Valid JSON, but beyond 64 bits: refused, and Python's int-from-str digit limit
    # must not leak out either.
    big = "9" * 5000
    raw = ('{"command": "subscribe", "topic": "t", "last_seen": ' + big + "}").encode()
    assert parse_line(raw) == MALFORMED
    assert parse_line(raw.replace(b": 9", b": -9")) == MALFORMED
    assert parse_line(b"[" + big.encode() + b"]") == MALFORMED
    assert parse_line(line({**SEND, "msg": big})) == Send("t", big, "all")


@pytest.mark.parametrize(
    "topic",
    ["", " ", "a" * 10_000, 'with "quotes" and \\ backslash', "thé ☃ 🎉", "\n\r\t", "\u2028"],
)
def test_arbitrary_topics_and_messages(topic: str) -> None:
    assert parse_line(line({**SUB, "topic": topic})) == Subscribe(topic)
    assert parse_line(line({**SEND, "topic": topic, "msg": topic})) == Send(topic, topic, "all")
    assert parse_line(json.dumps({**SUB, "topic": topic}, ensure_ascii=False).encode()) == (
        Subscribe(topic)
    )


def test_key_order_and_spacing_are_free() -> None:
    raw = b'{ "delivery" :"one","msg":"m" ,  "topic":"t","command":"send" }'
    assert parse_line(raw) == Send("t", "m", "one")
    assert parse_line(b'{"topic":"t","command":"subscribe","cache":false,"last_seen":3}') == (
        Subscribe("t", 3, False)
    )


# --- deep nesting ---------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "reply"), [(10, MALFORMED), (100_000, PARSE)])
def test_deep_nesting_valid(depth: int, reply: Failure) -> None:
    # Beyond the decoder's depth (about 950 levels) valid JSON is "Could not parse json"
    # (docs/protocol.md, extensions): it is never a command, and is not read further.
    assert parse_line(b"[" * depth + b"]" * depth) == reply
    assert parse_line(b'{"a":' * depth + b"1" + b"}" * depth) == reply
    deep_msg = b'{"command": "send", "topic": "t", "delivery": "all", "msg": '
    assert parse_line(deep_msg + b"[" * depth + b"]" * depth + b"}") == reply


@pytest.mark.parametrize("depth", [10, 100_000])
def test_deep_nesting_invalid_is_parse_error(depth: int) -> None:
    assert parse_line(b"[" * depth) == PARSE
    assert parse_line(b"[" * depth + b"]" * (depth - 1)) == PARSE
    assert parse_line(b"[" * depth + b"}" * depth) == PARSE
    assert parse_line(b"[" * depth + b"1,]" + b"]" * (depth - 1)) == PARSE
    assert parse_line(b'{"a":' * depth + b"}" * depth) == PARSE


@pytest.mark.parametrize(
    "text, valid",
    [
        ("[]", True),
        ("{}", True),
        ('{"a": [1, -2.5e3, "x\\u00e9", true, false, null, {"b": {}}]}', True),
        (" [ 1 , 2 ] ", True),
        ("[1,]", False),
        ("[1 2]", False),
        ('{"a" 1}', False),
        ('{"a": 1,}', False),
        ("{1: 2}", False),
        ("[}", False),
        ("[] []", False),
        ("", False),
        ('"\\x"', False),
        ("01", False),
        ("[" * 50 + "]" * 50, True),
        ("[" * 50 + "]" * 49, False),
        ('{"a":' * 50 + "0" + "}" * 50, True),
    ],
)
def test_is_json(text: str, valid: bool) -> None:
    # the parser's well-formedness check (msgspec, with what only Python's json reads)
    assert _parse._is_json(text.encode()) is valid
    if "[" * 50 not in text and '{"a":' * 50 not in text:
        try:
            json.loads(text)
        except ValueError:
            ok = False
        else:
            ok = True
        assert ok is valid


# --- LineBuffer: framing and the line limit ---------------------------------------------


def test_linebuffer_lines_and_crlf() -> None:
    buf = LineBuffer()
    assert buf.feed(b"a\nb\r\nc") == [b"a", b"b\r"]
    assert buf.pending == b"c"
    assert buf.feed(b"\n") == [b"c"]
    assert buf.pending == b""
    assert buf.feed(b"\n\n") == [b"", b""]
    assert not buf.too_long


def test_linebuffer_byte_by_byte() -> None:
    data = b"".join(line({**SEND, "msg": str(i)}) + b"\r\n" for i in range(20))
    buf = LineBuffer()
    got: list[bytes] = []
    for i in range(len(data)):
        got.extend(buf.feed(data[i : i + 1]))
    assert [parse_line(x) for x in got] == [Send("t", str(i), "all") for i in range(20)]
    assert buf.pending == b""


def test_linebuffer_many_lines_in_one_feed() -> None:
    data = b"".join(b"%d\n" % i for i in range(10_000))
    assert LineBuffer().feed(data) == [b"%d" % i for i in range(10_000)]


def test_linebuffer_limit_partial_line() -> None:
    buf = LineBuffer(max_line_bytes=10)
    assert buf.feed(b"0123456789") == []
    assert not buf.too_long
    assert buf.feed(b"a") == []
    assert buf.too_long


def test_linebuffer_limit_exact_line_is_fine() -> None:
    buf = LineBuffer(max_line_bytes=10)
    assert buf.feed(b"0123456789\nabc") == [b"0123456789"]
    assert not buf.too_long


def test_linebuffer_limit_complete_line_with_earlier_lines() -> None:
    buf = LineBuffer(max_line_bytes=10)
    assert buf.feed(b"one\ntwo\n" + b"x" * 11 + b"\nthree\n") == [b"one", b"two"]
    assert buf.too_long


def test_linebuffer_limit_partial_line_after_complete_lines() -> None:
    buf = LineBuffer(max_line_bytes=10)
    assert buf.feed(b"one\ntwo\n" + b"x" * 11) == [b"one", b"two"]
    assert buf.too_long


def test_linebuffer_limit_across_feeds() -> None:
    buf = LineBuffer(max_line_bytes=10)
    assert buf.feed(b"ok\n01234") == [b"ok"]
    assert buf.feed(b"56789") == []
    assert not buf.too_long
    assert buf.feed(b"0\n") == []
    assert buf.too_long


# --- encode_delivery ------------------------------------------------------------------


def roundtrip(obj: dict[str, Any], index: int, **dumps: Any) -> Any:
    raw = json.dumps(obj, **dumps).encode()
    send = parse_line(raw)
    assert isinstance(send, Send)
    payload = encode_delivery(send, index)
    assert b"\n" not in payload and b"\r" not in payload
    return json.loads(payload)


@pytest.mark.parametrize(
    "obj",
    [
        SEND,
        {**SEND, "delivery": "one"},
        {**SEND, "cache": True},
        {**SEND, "cache": False},
        {**SEND, "delivery": "one", "cache": False},
        {**SEND, "topic": "", "msg": ""},
        {**SEND, "topic": 'q"uo\\te}', "msg": '{"nested": "json"}'},
        {**SEND, "topic": "thé ☃ 🎉", "msg": "\u2028\u0000\t"},
        {"msg": "first", "delivery": "all", "topic": "t", "command": "send"},
    ],
)
@pytest.mark.parametrize("ascii_only", [True, False])
def test_encode_delivery_is_the_object_plus_index(obj: dict[str, Any], ascii_only: bool) -> None:
    assert roundtrip(obj, 7, ensure_ascii=ascii_only) == {**obj, "index": 7}


def test_encode_delivery_whitespace_around_object() -> None:
    send = parse_line(b"  \t" + line(SEND) + b"  \r")
    assert isinstance(send, Send)
    assert json.loads(encode_delivery(send, 0)) == {**SEND, "index": 0}


def test_encode_delivery_cache_presence_is_kept() -> None:
    assert "cache" not in roundtrip(SEND, 0)
    assert roundtrip({**SEND, "cache": True}, 0)["cache"] is True


def test_encode_delivery_without_raw() -> None:
    # Commands built in code (no received text) still encode to the contract's shape.
    assert json.loads(encode_delivery(Send("t", "m", "one"), 3)) == {
        "command": "send", "topic": "t", "msg": "m", "delivery": "one", "index": 3
    }
    assert json.loads(encode_delivery(Send("t", "m", "all", False), 0))["cache"] is False


def test_encode_delivery_large_index() -> None:
    assert roundtrip(SEND, 2**40)["index"] == 2**40


def test_linebuffer_accepts_bytearray_and_returns_bytes() -> None:
    buf = LineBuffer()
    assert buf.feed(bytearray(b"ab")) == []
    lines = buf.feed(bytearray(b"c\nd\n"))
    assert lines == [b"abc", b"d"] and all(type(x) is bytes for x in lines)
    lines = buf.feed(bytearray(b"e\n"))
    assert lines == [b"e"] and type(lines[0]) is bytes
    assert type(buf.pending) is bytes


def test_linebuffer_long_line_in_small_pieces() -> None:
    # 1 MiB in 64-byte pieces: must be linear (this took minutes when each piece copied
    # and rescanned the whole partial line).
    line = json.dumps({**SEND, "msg": "x" * ((1 << 20) - 100)}).encode()
    assert len(line) <= 1 << 20
    buf = LineBuffer()
    for i in range(0, len(line), 64):
        assert buf.feed(line[i : i + 64]) == []
    assert buf.pending == line and not buf.too_long
    assert buf.feed(b"\r\n") == [line + b"\r"]
    assert buf.pending == b""
