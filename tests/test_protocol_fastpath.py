"""Differential tests of the msgspec fast path against the stdlib parsing path.

``parse_line`` tries msgspec first and falls back to ``parse_line_stdlib``; the fast path
may only ever accept what the stdlib path turns into the identical ``Send`` (raw bytes
included). Thousands of generated and mutated lines go through both and must give the same
event. They come from the run's random seed (the ``seed`` fixture prints it; rerun a
failure with ``MQ_TRIO_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

import msgspec
import pytest

from mq_trio import protocol
from mq_trio.protocol import (
    Send,
    SendEx,
    _parse,
    parse_line,
    parse_line_stdlib,
    parse_text_stdlib,
)

# --- comparing events -----------------------------------------------------------------


def describe(event: protocol.LineEvent) -> tuple[Any, ...]:
    """Everything observable about an event: its type and every field, raw included."""
    if event is None:
        return (None,)
    if isinstance(event, Send):
        assert type(event.raw) is bytes
        extra = (event.ack, event.id) if isinstance(event, SendEx) else ()
        return (type(event), event.topic, event.msg, event.delivery, event.cache, event.raw,
                *extra)
    return (type(event), event)


def fast_accepts(data: bytes | str) -> bool:
    """Whether msgspec decodes ``data`` as a send (so the stdlib path is not used)."""
    try:
        decoded = _parse._decode_command(data)
    except Exception:
        return False
    return type(decoded) in (_parse._SendSchema, protocol.Ack, protocol.Nack, protocol.Progress)


def check(line: bytes) -> bool:
    """Assert that both paths agree on ``line`` (and on its text); True if msgspec took it."""
    assert describe(parse_line(line)) == describe(parse_line_stdlib(line)), line
    return fast_accepts(line)


# --- generating lines -------------------------------------------------------------------

# Whitespace of every kind: JSON's own, other ASCII control "whitespace" that str.strip
# removes (\x0b \x0c \x1c-\x1f), and Unicode spaces (NBSP, NEL, em space, ideographic).
JSON_WS = [" ", "\t", "\r", "\n"]
OTHER_WS = ["\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000", "\ufeff"]

STRINGS = [
    "", "t", "bench", "x" * 64, " ", "a b", 'q"uote', "back\\slash", "sl/ash", "thé",
    "☃", "🎉", "\u2028\u2029", "\x00", "\x01\x1f", "\x7f", "\t\n\r", "}", "{", ",", ":",
    '"}', "\\u0041", "send", "all", "one", "\ufeff", "é" * 30, "\U0010ffff",
]


def rand_string(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(STRINGS)
    if choice < 0.8:
        return "".join(rng.choice(STRINGS) for _ in range(rng.randint(1, 4)))
    alphabet = "ab \"\\/\b\f\n\r\t\x00\x1f\x7féß☃🎉\u2028"
    if rng.random() < 0.2:
        alphabet += "\ud800\udc00\udfff"  # escaped lone surrogates or pairs
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def enc_string(s: str, rng: random.Random) -> str:
    """A JSON string literal for ``s`` with escapes chosen at random (valid JSON)."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        r = rng.random()
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF or r < 0.15:
            short = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "/": "\\/"}
            if ch in short and rng.random() < 0.5:
                out.append(short[ch])
            elif code > 0xFFFF:
                code -= 0x10000
                hi, lo = 0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)
                pair = f"\\u{hi:04x}\\u{lo:04X}", f"\\u{hi:04X}\\u{lo:04x}"
                out.append(rng.choice(pair))
            else:
                out.append(f"\\u{code:04x}" if rng.random() < 0.5 else f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def enc_value(value: Any, rng: random.Random) -> str:
    if isinstance(value, str):
        return enc_string(value, rng)
    if isinstance(value, RawJSON):
        return value.text
    return json.dumps(value)


class RawJSON:
    """A value written verbatim (invalid or unusual JSON on purpose)."""

    def __init__(self, text: str) -> None:
        self.text = text


ODD_VALUES: list[Any] = [
    1, 0, -1, 1.5, True, False, None, [], {}, ["send"], {"a": 1}, "", "x",
    RawJSON("NaN"), RawJSON("Infinity"), RawJSON("1e400"), RawJSON("9" * 5000),
    RawJSON('"\\ud800"'), RawJSON('"\\udc00\\ud800"'), RawJSON('"\\x"'), RawJSON("tru"),
    RawJSON('"a\x01b"'), RawJSON("[" * 50 + "]" * 50),
]

COMMANDS: list[Any] = ["send"] * 6 + ["subscribe", "unsubscribe", "Send", "SEND", "send ",
                                      "", "quit", 1, None, True, ["send"]]
DELIVERIES: list[Any] = ["all"] * 4 + ["one"] * 4 + ["ALL", "One", " all", "any", "", 1, None]
CACHES: list[Any] = [True, False, 1, 0, "true", None, [True]]
EXTRA_KEYS = ["index", "last_seen", "epoch", "Topic", "", "cache ", "msgs", "command\u0000"]


def ws(rng: random.Random, other: float = 0.0) -> str:
    """Usually nothing, sometimes JSON whitespace, rarely other whitespace."""
    r = rng.random()
    if r < 0.6:
        return ""
    pool = OTHER_WS if rng.random() < other else JSON_WS
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 3)))


def clean_send_pairs(rng: random.Random) -> list[tuple[str, Any]]:
    """A valid send in any key order, maybe with duplicate keys whose last value is valid."""
    pairs: list[tuple[str, Any]] = [
        ("command", "send"),
        ("topic", rand_string(rng)),
        ("msg", rand_string(rng)),
        ("delivery", rng.choice(["all", "one"])),
    ]
    if rng.random() < 0.4:
        pairs.append(("cache", rng.choice([True, False])))
    if rng.random() < 0.25:  # the work-queue extensions: a job, a message id
        pairs.append(("ack", rng.choice([True, True, False])))
    if rng.random() < 0.2:
        pairs.append(("id", rng.choice([rand_string(rng), "k" * 256, "k" * 257, ""])))
    rng.shuffle(pairs)
    if rng.random() < 0.2:
        # an earlier occurrence of a key with another valid value (refused: duplicate key)
        key, _ = rng.choice(pairs)
        other = {"command": "send", "topic": rand_string(rng), "msg": rand_string(rng),
                 "delivery": rng.choice(["all", "one"]), "cache": rng.choice([True, False]),
                 "ack": rng.choice([True, False]), "id": rand_string(rng)}
        first = next(i for i, (k, _) in enumerate(pairs) if k == key)
        pairs.insert(rng.randint(0, first), (key, other[key]))
    return pairs


def send_pairs(rng: random.Random) -> list[tuple[str, Any]]:
    """Key/value pairs of a send with some field varied: type, value, presence, duplicates."""
    pairs = clean_send_pairs(rng)
    r = rng.random()
    if r < 0.15:
        pairs.append(("command", rng.choice(COMMANDS)))
    elif r < 0.3:
        pairs.append(("delivery", rng.choice(DELIVERIES)))
    elif r < 0.45:
        pairs.append(("cache", rng.choice(CACHES)))
    elif r < 0.6:
        pairs.append((rng.choice(["topic", "msg"]), rng.choice(ODD_VALUES)))
    elif r < 0.7:
        del pairs[rng.randrange(len(pairs))]  # a missing key
    elif r < 0.8:
        pairs.append((rng.choice(EXTRA_KEYS), rng.choice(ODD_VALUES + ["v"])))
    if rng.random() < 0.5:
        # duplicates of any key, with a value that is the same, valid or not, anywhere
        for _ in range(rng.randint(1, 3)):
            key, value = rng.choice(pairs)
            dup = rng.choice([value, value, rng.choice(ODD_VALUES), rand_string(rng),
                              rng.choice(COMMANDS), rng.choice(DELIVERIES), rng.choice(CACHES)])
            pairs.insert(rng.randint(0, len(pairs)), (key, dup))
    if rng.random() < 0.5:
        rng.shuffle(pairs)
    return pairs


def subscribe_pairs(rng: random.Random) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [
        ("command", rng.choice(["subscribe", "unsubscribe"])),
        ("topic", rand_string(rng)),
    ]
    if rng.random() < 0.5:
        pairs.append(("last_seen", rng.choice([-1, 0, 5, 2**70, True, 1.0])))
    if rng.random() < 0.3:
        pairs.append(("cache", rng.choice(CACHES)))
    if rng.random() < 0.2:
        pairs.append(("msg", "m"))
    if rng.random() < 0.2:
        pairs.append(("delivery", "all"))
    rng.shuffle(pairs)
    return pairs


def job_command_pairs(rng: random.Random) -> list[tuple[str, Any]]:
    """ack, nack (maybe with a delay) and progress, sometimes wrong on purpose."""
    command = rng.choice(["ack", "nack", "progress"])
    pairs: list[tuple[str, Any]] = [
        ("command", command),
        ("topic", rand_string(rng)),
        ("index", rng.choice([0, 5, 2**63 - 1, 2**63, -1, True, 1.0, "1", None])),
    ]
    if rng.random() < 0.4:
        pairs.append(("delay", rng.choice([0, 2.5, 86_400, 86_400.5, -1, True, "1", 1e400])))
    if rng.random() < 0.1:
        pairs.append((rng.choice(EXTRA_KEYS), "v"))
    if rng.random() < 0.2:
        key, value = rng.choice(pairs)
        pairs.insert(rng.randint(0, len(pairs)), (key, rng.choice([value, 7, "x"])))
    rng.shuffle(pairs)
    return pairs


def enc_key(key: str, rng: random.Random) -> str:
    # keys spelled with escapes ("comm\u0061nd") are the same key to both parsers
    return enc_string(key, rng) if rng.random() < 0.1 else json.dumps(key)


def write_object(pairs: list[tuple[str, Any]], rng: random.Random, other_ws: float) -> str:
    parts = []
    for key, value in pairs:
        parts.append(
            ws(rng, other_ws) + enc_key(key, rng) + ws(rng, other_ws) + ":"
            + ws(rng, other_ws) + enc_value(value, rng) + ws(rng, other_ws)
        )
    return "{" + ",".join(parts) + "}"


def surround(text: str, rng: random.Random, other: float) -> str:
    return ws(rng, other) + text + ws(rng, other)


def encode(text: str) -> bytes:
    # surrogatepass: a lone surrogate character (not an escape) becomes the invalid
    # UTF-8 bytes a broken client might send
    return text.encode("utf-8", "surrogatepass")


INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80",
                b"\xf4\x90\x80\x80", b"\xef\xbb\xbf"]


def mutate(line: bytes, rng: random.Random) -> bytes:
    """Truncate, flip, insert or delete bytes of a (usually valid) line."""
    data = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        pos = rng.randint(0, len(data))
        if r < 0.25:
            data = data[:pos]
        elif r < 0.5 and pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
        elif r < 0.65 and pos < len(data):
            data[pos] = rng.randrange(256)
        elif r < 0.8:
            data[pos:pos] = rng.choice(INVALID_UTF8 + [b'"', b"\\", b",", b"}", b"{", b" ",
                                                     b"\x00", b"\x0c", b"\xc2\xa0"])
        elif pos < len(data):
            del data[pos]
    return bytes(data)


def generated_lines(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            text = surround(write_object(clean_send_pairs(rng), rng, 0.0), rng, 0.0)
        elif r < 0.55:
            text = surround(write_object(send_pairs(rng), rng, 0.0), rng, 0.1)
        elif r < 0.62:
            text = surround(write_object(subscribe_pairs(rng), rng, 0.0), rng, 0.1)
        elif r < 0.67:
            obj: dict[str, Any] = {"command": "send", "topic": rand_string(rng),
                                   "msg": rand_string(rng), "delivery": rng.choice(["all", "one"])}
            if rng.random() < 0.5:
                obj["cache"] = rng.choice([True, False])
            text = json.dumps(obj, ensure_ascii=rng.random() < 0.5,
                              separators=rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]))
        elif r < 0.75:
            # whitespace of every kind, around and inside
            text = surround(write_object(clean_send_pairs(rng), rng, 0.3), rng, 0.6)
        elif r < 0.78:
            text = surround(rng.choice(["quit", "", "[]", "null", '"send"', "{}", "[{}]", "0"]),
                            rng, 0.3)
        elif r < 0.84:
            text = surround(write_object(job_command_pairs(rng), rng, 0.0), rng, 0.1)
            if rng.random() < 0.3:
                yield mutate(encode(text), rng)
                continue
        else:
            pairs = clean_send_pairs(rng) if rng.random() < 0.5 else send_pairs(rng)
            text = surround(write_object(pairs, rng, 0.0), rng, 0.1)
            yield mutate(encode(text), rng)
            continue
        yield encode(text)


# --- the tests ----------------------------------------------------------------------------


def test_generated_and_mutated_lines_agree(seed: int) -> None:
    accepted = rejected = 0
    for line in generated_lines(40_000, seed):
        if check(line):
            accepted += 1
        else:
            rejected += 1
    # both paths are exercised a lot (the generator is not degenerate)
    assert accepted > 10_000 and rejected > 10_000, (accepted, rejected)


def test_the_canonical_send_takes_the_fast_path() -> None:
    line = json.dumps({"command": "send", "topic": "bench", "msg": "x" * 64,
                       "delivery": "all"}).encode()
    assert fast_accepts(line)
    event = parse_line(line)
    assert isinstance(event, Send) and event.raw == line


KNOWN: list[bytes] = [
    # a missing "command" is malformed: the fast path must not default it
    b'{"topic": "t", "msg": "m", "delivery": "all"}',
    # duplicate keys: refused as malformed, in both paths (docs/protocol.md, extensions)
    b'{"command": "send", "topic": "a", "topic": "b", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "command": "subscribe"}',
    b'{"command": "subscribe", "topic": "t", "msg": "m", "delivery": "all", "command": "send"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "cache": 1, "cache": true}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "cache": true, "cache": 1}',
    b'{"command": "send", "topic": 1, "topic": "t", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "delivery": "one", "topic": "t", "msg": "m", "delivery": "all"}',
    # escapes, surrogates, invalid UTF-8
    b'{"command": "send", "topic": "\\ud800", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "\\ud83c\\udf89", "msg": "\\/", "delivery": "all"}',
    b'{"command": "send", "topic": "\\udf89\\ud83c", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "\xed\xa0\x80", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "\xff", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "\x01", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "\x7f", "msg": "m", "delivery": "all"}',
    b'{"comm\\u0061nd": "s\\u0065nd", "topic": "t", "msg": "m", "delivery": "\\u0061ll"}',
    # whitespace: JSON's own is skipped by both; other whitespace only by str.strip
    b' \t\r\n{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}\n\r\t ',
    b'\x0c{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}\x0b',
    b'\xc2\xa0{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}\xe3\x80\x80',
    b'\xef\xbb\xbf{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}',
    b'{"command": "send",\x0c"topic": "t", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}\x00',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all",}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"} {}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "index": 0}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "cache": null}',
    b'{"command": "send", "topic": "t", "msg": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b', "command": "send", "topic": "t"}',
    b'{"command": "subscribe", "topic": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    # other commands are recognised by msgspec too, and must still go the stdlib way
    b'{"command": "unsubscribe", "topic": "t", "command": "send", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "command": "unsubscribe"}',
    b'{"topic": "t", "msg": "m", "delivery": "all", "command": "send"}',
    b'{"command": "subscribe", "topic": "t", "last_seen": 3, "epoch": null}',
    b'{"command": "quit"}',
    b'{"command": null, "topic": "t", "msg": "m", "delivery": "all"}',
    b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all", "x": ' + b"9" * 5000 + b"}",
]


@pytest.mark.parametrize("line", KNOWN)
def test_known_edge_cases_agree(line: bytes) -> None:
    check(line)


def test_parse_text_stdlib_with_lone_surrogate_characters() -> None:
    # Only a str can hold one (no strict UTF-8 decode makes it): the Send still encodes
    # to valid UTF-8 (escaped) rather than failing at publish.
    text = '{"command": "send", "topic": "\ud800", "msg": "m", "delivery": "all"}'
    event = parse_text_stdlib(text)
    assert isinstance(event, Send)
    assert json.loads(protocol.encode_delivery(event, 1))["topic"] == "\ud800"


@pytest.mark.parametrize(
    "breakage",
    [
        # a fast path that strips too little, or not at all
        lambda line: line.strip(b" "),
        lambda line: line,
    ],
)
def test_the_comparison_would_notice_a_wrong_raw(
    breakage: Callable[[bytes], bytes], seed: int
) -> None:
    # The differential check is only worth something if it can fail: a fast path that
    # produced a different raw must be caught on the generated lines.
    def broken(line: bytes) -> protocol.LineEvent:
        try:
            s = _parse._decode_command(line)
        except Exception:
            return parse_line_stdlib(line)
        if type(s) is not _parse._SendSchema:
            return parse_line_stdlib(line)
        return Send(s.topic, s.msg, s.delivery, s.cache is not False, breakage(line))

    caught = 0
    for line in generated_lines(5_000, seed):
        if describe(broken(line)) != describe(parse_line_stdlib(line)):
            caught += 1
    assert caught > 0


def test_the_comparison_would_notice_a_lax_schema(seed: int) -> None:
    class Lax(msgspec.Struct):
        topic: str
        msg: str
        delivery: Literal["all", "one"]
        cache: bool = True
        command: str = "send"  # no forbid_unknown_fields either

    decode = msgspec.json.Decoder(Lax).decode

    def broken(line: bytes) -> protocol.LineEvent:
        try:
            s = decode(line)
        except Exception:
            return parse_line_stdlib(line)
        return Send(s.topic, s.msg, s.delivery, s.cache, line.strip(b" \t\n\r"))

    assert any(
        describe(broken(line)) != describe(parse_line_stdlib(line))
        for line in generated_lines(5_000, seed)
    )


@pytest.mark.parametrize("line", [
    b'{"command":"ack","topic":"","index":0,"index":0}',  # the shortest with a fourth member
    b'{"command":"ack","topic":"q","index":1,"index":2}',
    b'{"command":"ack","topic":"","topic":"","index":2}',
    b'{"command":"progress","topic":"a","index":0,"topic":""}',
    b'{"command":"ack","index":0,"topic":"t","command":"ack"}',
    b'{"command":"nack","topic":"t","index":0,"delay":1,"delay":2}',
    b'{"command":"send","topic":"t","msg":"","delivery":"one","ack":true,"ack":true}',
    b'{"command":"send","topic":"t","msg":"","delivery":"one","id":"a","id":"b"}',
])
def test_work_queue_lines_with_a_repeated_key_are_refused(line: bytes) -> None:
    """The fast path's member counts for jobs and acks (a length bound, then quotes)."""
    assert parse_line(line) == parse_line_stdlib(line) == protocol.Failure(protocol.MALFORMED)
