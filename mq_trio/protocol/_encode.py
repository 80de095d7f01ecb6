"""Encoding: the server's replies and deliveries, and the client's commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii

from ._commands import (
    DECODE_ERROR,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    MALFORMED,
    MAX_BATCH,
    MAX_ID_CHARS,
    MAX_NACK_DELAY,
    MAX_PREFETCH,
    PARSE_ERROR,
    STORAGE_UNAVAILABLE,
    Delivery,
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
    for r in (DECODE_ERROR, PARSE_ERROR, MALFORMED, INTERNAL_ERROR, LINE_TOO_LONG,
              STORAGE_UNAVAILABLE)
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


# --- commands (the client's side) ----------------------------------------------------
# One encoding for every sender (the client library, the benchmark's load generator), so
# the bytes on the wire are the same whoever sends. The output is byte for byte what
# ``json.dumps`` writes for the command's dict (default separators, ASCII with \u
# escapes, optional keys left out at their default): built from the C string escaper
# json.dumps itself uses, without a dict and the generic encoder per message.


def encode_send(topic: str, msg: str, delivery: Delivery = "all", cache: bool = True) -> bytes:
    """A ``send`` command (one JSON object, no terminator); ``cache`` only when False.

    Raises ValueError for a ``delivery`` other than ``"all"`` or ``"one"``: the server
    would only answer ``Malformed json message``, and a caller is better told at once.
    """
    if delivery != "all" and delivery != "one":
        raise ValueError(f"delivery must be 'all' or 'one', not {delivery!r}")
    text = (
        '{"command": "send", "topic": '
        + encode_basestring_ascii(topic)
        + ', "msg": '
        + encode_basestring_ascii(msg)
        + (', "delivery": "all"' if delivery == "all" else ', "delivery": "one"')
        + ("}" if cache else ', "cache": false}')
    )
    return text.encode("ascii")


def encode_subscribe(
    topic: str, last_seen: int = -1, cache: bool = True, epoch: str | None = None
) -> bytes:
    """A ``subscribe`` command; ``last_seen``, ``cache`` and ``epoch`` only when not default.

    Left out at their defaults so a plain subscribe is understood by any version-1
    server; ``epoch`` (the extension, docs/protocol.md) goes out whenever it is a string,
    even ``""`` (a client that wants to learn the server's epoch).
    """
    text = '{"command": "subscribe", "topic": ' + encode_basestring_ascii(topic)
    if last_seen != -1:
        text += f', "last_seen": {last_seen:d}'
    if not cache:
        text += ', "cache": false'
    if epoch is not None:
        text += ', "epoch": ' + encode_basestring_ascii(epoch)
    return (text + "}").encode("ascii")


def encode_unsubscribe(topic: str) -> bytes:
    """An ``unsubscribe`` command."""
    text = '{"command": "unsubscribe", "topic": ' + encode_basestring_ascii(topic) + "}"
    return text.encode("ascii")


def encode_auth(
    token: str | None = None, user: str | None = None, password: str | None = None
) -> bytes:
    """An ``auth`` command: a token, or a user and a password (docs/protocol.md)."""
    if token is not None:
        text = '{"command": "auth", "token": ' + encode_basestring_ascii(token) + "}"
    elif user is not None and password is not None:
        text = (
            '{"command": "auth", "user": ' + encode_basestring_ascii(user)
            + ', "password": ' + encode_basestring_ascii(password) + "}"
        )
    else:
        raise ValueError("auth needs a token, or a user and a password")
    return text.encode("ascii")


def frame(items: list[bytes], terminator: bytes = b"\n") -> bytes:
    """Encoded items as one write for a line transport: each followed by ``terminator``.

    The server accepts ``\\n`` or ``\\r\\n`` (docs/protocol.md); clients send ``\\n``.
    ``items`` is not modified. Joining once (the empty last item supplies the final
    terminator) copies the bytes once, not twice as ``join(...) + terminator`` would.
    """
    if not items:
        return b""
    return terminator.join([*items, b""])


# --- the work-queue extensions (docs/protocol.md, "Acknowledged jobs") ----------------


def index_reply(index: int, count: int | None = None, duplicate: bool = False) -> bytes:
    """The success reply that carries the index: a job, a send with an ``id``, a batch
    (``count``); ``duplicate`` for a repeated id."""
    if count is None and not duplicate:  # a job's reply: one format, no concatenation
        return b'{"success": true, "index": %d}' % index
    text = b'{"success": true, "index": %d' % index
    if count is not None:
        text += b', "count": %d' % count
    if duplicate:
        text += b', "duplicate": true'
    return text + b"}"


def encode_command(topic: str, msg: str, delivery: Delivery, cache: bool = True,
                   ack: bool = False, **extra: object) -> bytes:
    """A ``send`` object as the server writes one it built itself (a batch's message, a
    dead letter): the keys of a send command, then ``extra``."""
    obj: dict[str, object] = {"command": "send", "topic": topic, "msg": msg,
                              "delivery": delivery}
    if not cache:
        obj["cache"] = False
    if ack:
        obj["ack"] = True
    obj.update(extra)
    return json.dumps(obj).encode()


def job_delivery(head: bytes, index: int, deliveries: int) -> bytes:
    """A job's delivery: its command (a JSON object without its closing brace, ``head``)
    plus ``"index"`` and ``"deliveries"``."""
    return b'%b, "index": %d, "deliveries": %d}' % (head, index, deliveries)


# --- the work-queue extensions' commands (the client's side) ---------------------------
# Checked here, so that a caller is told at once rather than getting "Malformed json
# message" back; written as json.dumps writes the command's dict, like the others.


def check_id(id: str) -> str:
    if type(id) is not str or not 1 <= len(id) <= MAX_ID_CHARS:
        raise ValueError(f"an id is a string of 1 to {MAX_ID_CHARS} characters, not {id!r}")
    return id


def check_prefetch(prefetch: int) -> int:
    if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
        raise ValueError(f"prefetch is an integer from 1 to {MAX_PREFETCH}, not {prefetch!r}")
    return prefetch


def _check_delivery(delivery: Delivery, ack: bool) -> None:
    if delivery != "all" and delivery != "one":
        raise ValueError(f"delivery must be 'all' or 'one', not {delivery!r}")
    if ack and delivery != "one":
        raise ValueError("a job (ack=True) needs delivery='one'")


def encode_publish(topic: str, msg: str, delivery: Delivery = "all", cache: bool = True,
                   ack: bool = False, id: str | None = None) -> bytes:
    """A ``send`` with the extensions' keys (``ack``, ``id``) when given."""
    _check_delivery(delivery, ack)
    if id is None:
        return encode_command(topic, msg, delivery, cache, ack)
    return encode_command(topic, msg, delivery, cache, ack, id=check_id(id))


def encode_batch(topic: str, msgs: Sequence[str], delivery: Delivery = "all",
                 cache: bool = True, ack: bool = False, id: str | None = None) -> bytes:
    """A ``batch``: 1 to 10,000 messages accepted (or refused) together."""
    _check_delivery(delivery, ack)
    if isinstance(msgs, str):
        raise TypeError("msgs is a sequence of strings, not one string")
    msgs = list(msgs)
    if not 1 <= len(msgs) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} messages, not {len(msgs)}")
    if any(type(m) is not str for m in msgs):
        raise TypeError("every message of a batch is a string")
    obj: dict[str, object] = {"command": "batch", "topic": topic, "msgs": msgs,
                              "delivery": delivery}
    if not cache:
        obj["cache"] = False
    if ack:
        obj["ack"] = True
    if id is not None:
        obj["id"] = check_id(id)
    return json.dumps(obj).encode("ascii")


def encode_consume(topic: str, prefetch: int = 1) -> bytes:
    """A consumer's ``subscribe``: ``"ack": true`` and its prefetch."""
    obj = {"command": "subscribe", "topic": topic, "ack": True,
           "prefetch": check_prefetch(prefetch)}
    return json.dumps(obj).encode("ascii")


def encode_job_command(command: str, topic: str, index: int,
                       delay: float | None = None) -> bytes:
    """``ack``, ``nack`` (``delay`` in seconds, left out when 0) or ``progress``."""
    obj: dict[str, object] = {"command": command, "topic": topic, "index": index}
    if delay:
        if not 0 <= delay <= MAX_NACK_DELAY or delay != delay:
            raise ValueError(f"a nack delay is 0 to {MAX_NACK_DELAY:g} seconds, not {delay!r}")
        obj["delay"] = delay
    return json.dumps(obj).encode("ascii")
