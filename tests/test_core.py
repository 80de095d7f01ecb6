"""The sans-IO connection core: bytes in, lines and events out; items in, framed bytes out."""

from __future__ import annotations

import json

from mq_trio.protocol import (
    QUIT,
    Failure,
    LineConnection,
    MessageConnection,
    Send,
    Subscribe,
    parse_line,
)

SUB = b'{"command": "subscribe", "topic": "t"}'
SEND = b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}'


def test_lines_split_anywhere_come_out_whole_and_in_order() -> None:
    core = LineConnection()
    stream = SUB + b"\r\n" + SEND + b"\n"
    lines: list[bytes] = []
    for i in range(0, len(stream), 7):  # 7-byte segments cut through both lines
        lines += core.receive_data(stream[i : i + 7])
    assert [type(parse_line(line)) for line in lines] == [Subscribe, Send]
    assert core.closing_reply() is None


def test_a_last_line_without_newline_counts_at_eof() -> None:
    core = LineConnection()
    assert core.receive_data(SUB) == []
    assert core.receive_eof() == [SUB]
    assert LineConnection().receive_eof() == []


def test_quit_is_a_line_like_any_other() -> None:
    core = LineConnection()
    lines = core.receive_data(b"quit\r\n" + SEND + b"\n")
    assert [parse_line(line) is QUIT for line in lines] == [True, False]


def test_over_the_limit_the_lines_before_count_then_line_too_long() -> None:
    core = LineConnection(max_line_bytes=len(SEND))
    lines = core.receive_data(SEND + b"\n" + b"x" * (len(SEND) + 1) + b"\n" + SUB + b"\n")
    assert lines == [SEND]
    reply = core.closing_reply()
    assert reply is not None and json.loads(reply) == {
        "success": False, "reason": "Line too long"}


def test_a_partial_line_over_the_limit_is_refused_before_its_newline() -> None:
    core = LineConnection(max_line_bytes=10)
    assert core.receive_data(b"y" * 11) == []
    assert core.closing_reply() is not None


def test_frame_terminates_every_item_with_crlf_in_order() -> None:
    assert LineConnection.frame([b"a", b"{}"]) == b"a\r\n{}\r\n"
    assert LineConnection.frame([]) == b""


def test_a_bad_line_is_a_failure_event_not_an_error() -> None:
    core = LineConnection()
    (line,) = core.receive_data(b"\xff\n")
    assert parse_line(line) == Failure("Could not decode input as UTF-8")


def test_one_message_is_one_command() -> None:
    core = MessageConnection(max_message_bytes=100)
    assert core.receive_message(SUB.decode()) == [SUB]
    assert core.receive_message(bytearray(SEND)) == [SEND]
    assert not core.too_big


def test_a_message_over_the_limit_in_utf8_bytes_is_too_big() -> None:
    core = MessageConnection(max_message_bytes=10)
    assert core.receive_message("é" * 6) == []  # 6 characters, 12 bytes
    assert core.too_big


def test_message_frame_is_one_text_per_item() -> None:
    assert MessageConnection.frame([b'{"success": true}', "ü".encode()]) == [
        '{"success": true}', "ü"]
