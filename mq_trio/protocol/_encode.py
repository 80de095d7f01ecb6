"""Encoding: the server's replies and deliveries, and the client's commands."""

from __future__ import annotations

import json

from ._commands import (
    DECODE_ERROR,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    MALFORMED,
    PARSE_ERROR,
    Send,
)

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

