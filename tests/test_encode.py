"""The command encoders of the protocol package: what the client and the benchmark send.

Two properties matter: every encoded command parses (``parse_line``, the server's own
parser) back into the command it encodes, and the bytes are exactly what the client and
the load generator sent before they shared these encoders (``json.dumps`` of the command's
dict, optional keys left out at their default), so nothing changed on the wire.
"""

from __future__ import annotations

import json

import pytest

from mq_trio.benchmark.dialects import MQ
from mq_trio.protocol import (
    Delivery,
    LineBuffer,
    Send,
    Subscribe,
    Unsubscribe,
    encode_send,
    encode_subscribe,
    encode_unsubscribe,
    frame,
    parse_line,
)

#: Plain, non-ASCII (BMP and astral: a surrogate pair when escaped), and every kind of
#: character JSON must escape: quote, backslash, controls, and the line breaks that
#: would otherwise end a line on the wire.
TEXTS = [
    "",
    "t",
    "news.sport",
    "é",
    "Grüße, 日本語",
    "🎉 emoji",
    'say "hi"',
    "back\\slash",
    "a/b",
    "tab\there",
    "line\nbreak\r\n",
    "\x00\x01\x1f\x7f",
    "\u2028\u2029",
    "\ufeffbom",
    " padded ",
]


def send_reference(topic: str, msg: str, delivery: str = "all", cache: bool = True) -> bytes:
    """How the client built a send before the shared encoder (the wire must not change)."""
    obj: dict[str, object] = {"command": "send", "topic": topic, "msg": msg, "delivery": delivery}
    if not cache:
        obj["cache"] = False
    return json.dumps(obj).encode()


def subscribe_reference(
    topic: str, last_seen: int = -1, cache: bool = True, epoch: str | None = None
) -> bytes:
    """The client's former ``_subscribe_line``."""
    obj: dict[str, object] = {"command": "subscribe", "topic": topic}
    if last_seen != -1:
        obj["last_seen"] = last_seen
    if not cache:
        obj["cache"] = False
    if epoch is not None:
        obj["epoch"] = epoch
    return json.dumps(obj).encode()


# --- round trips through the server's parser -------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("delivery", ["all", "one"])
@pytest.mark.parametrize("cache", [True, False])
def test_send_round_trip(text: str, delivery: Delivery, cache: bool) -> None:
    line = encode_send(text, text[::-1], delivery, cache)
    assert parse_line(line) == Send(text, text[::-1], delivery, cache)
    assert line == send_reference(text, text[::-1], delivery, cache)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("last_seen", [-1, 0, 41, 2**53])
@pytest.mark.parametrize("cache", [True, False])
def test_subscribe_round_trip(text: str, last_seen: int, cache: bool) -> None:
    line = encode_subscribe(text, last_seen, cache)
    assert parse_line(line) == Subscribe(text, last_seen, cache)
    assert line == subscribe_reference(text, last_seen, cache)


@pytest.mark.parametrize("epoch", ["", "3f2a-epoch", "é\n\"x\""])
def test_subscribe_epoch_round_trip(epoch: str) -> None:
    line = encode_subscribe("t", 7, False, epoch)
    assert parse_line(line) == Subscribe("t", 7, False, epoch)
    assert line == subscribe_reference("t", 7, False, epoch)


@pytest.mark.parametrize("text", TEXTS)
def test_unsubscribe_round_trip(text: str) -> None:
    line = encode_unsubscribe(text)
    assert parse_line(line) == Unsubscribe(text)
    assert line == json.dumps({"command": "unsubscribe", "topic": text}).encode()


def test_lone_surrogate_is_escaped_like_json_dumps() -> None:
    # A Python str may hold one; it must still go out as ASCII (escaped), never raise.
    assert encode_send("t", "\ud800") == send_reference("t", "\ud800")
    assert encode_subscribe("\udfff") == subscribe_reference("\udfff")
    assert parse_line(encode_unsubscribe("\ud800x")) == Unsubscribe("\ud800x")


# --- the shape: ASCII, one line, optional keys only when needed -------------------------


def test_output_is_one_ascii_line() -> None:
    for line in (
        encode_send("日本\n", "🎉\r\n"),
        encode_subscribe("\u2028", 3, False, "é"),
        encode_unsubscribe("a\nb"),
    ):
        assert line.isascii()
        assert b"\n" not in line and b"\r" not in line


def test_optional_fields_omitted_when_default() -> None:
    assert json.loads(encode_send("t", "m")) == {
        "command": "send",
        "topic": "t",
        "msg": "m",
        "delivery": "all",
    }
    assert json.loads(encode_send("t", "m", cache=False))["cache"] is False
    # A plain subscribe is understood by any version-1 server: no extra keys.
    assert json.loads(encode_subscribe("t")) == {"command": "subscribe", "topic": "t"}
    assert json.loads(encode_subscribe("t", last_seen=5)) == {
        "command": "subscribe",
        "topic": "t",
        "last_seen": 5,
    }
    assert json.loads(encode_subscribe("t", cache=False)) == {
        "command": "subscribe",
        "topic": "t",
        "cache": False,
    }
    # The epoch goes out whenever it is a string, even empty (asking the server's).
    assert json.loads(encode_subscribe("t", epoch=""))["epoch"] == ""
    assert json.loads(encode_unsubscribe("t")) == {"command": "unsubscribe", "topic": "t"}


def test_send_rejects_unknown_delivery() -> None:
    with pytest.raises(ValueError, match="delivery must be 'all' or 'one'"):
        encode_send("t", "m", "some")  # type: ignore[arg-type]


# --- framing --------------------------------------------------------------------------


def test_frame_terminates_every_item() -> None:
    assert frame([]) == b""
    assert frame([b"a"]) == b"a\n"
    assert frame([b"a", b"b"]) == b"a\nb\n"
    assert frame([b"a", b"b"], b"\r\n") == b"a\r\nb\r\n"


def test_frame_leaves_its_argument_alone() -> None:
    items = [b"a", b"b"]
    frame(items)
    assert items == [b"a", b"b"]


def test_framed_commands_come_back_through_line_buffer() -> None:
    commands = [
        encode_subscribe("日本", 2, epoch=""),
        encode_send("日本", "line\nbreak", "one"),
        encode_unsubscribe("日本"),
    ]
    data = frame(commands)
    buffer = LineBuffer()
    # Fed in small pieces, as a stream arrives: the lines are still exactly the commands.
    lines = [line for i in range(0, len(data), 7) for line in buffer.feed(data[i : i + 7])]
    assert lines == commands
    assert [parse_line(line) for line in lines] == [
        Subscribe("日本", 2, True, ""),
        Send("日本", "line\nbreak", "one"),
        Unsubscribe("日本"),
    ]


# --- the load generator speaks the same bytes ------------------------------------------


def test_benchmark_dialect_uses_the_encoders() -> None:
    assert MQ.publish("bench.t", "x" * 64) == frame([encode_send("bench.t", "x" * 64)])
    assert MQ.subscribe("bench.t") == frame([encode_subscribe("bench.t")])
    # ... which are the bytes it sent before (json.dumps plus "\n").
    assert MQ.publish("é", "m") == send_reference("é", "m") + b"\n"
    assert MQ.subscribe("é") == subscribe_reference("é") + b"\n"
