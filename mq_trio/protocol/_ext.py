"""Validation of the work-queue extensions (docs/protocol.md, "Acknowledged jobs",
"Atomic batches", "Idempotent publishing"): jobs, consumers, ack/nack/progress, batches
and message ids. Off the version-1 hot path: only lines that use these keys come here."""

from __future__ import annotations

from typing import cast

import msgspec

from ._commands import (
    _MALFORMED,
    INT_MAX,
    MAX_BATCH,
    MAX_ID_CHARS,
    MAX_NACK_DELAY,
    MAX_PREFETCH,
    Ack,
    Batch,
    Delivery,
    Failure,
    JobCommand,
    Nack,
    Progress,
    SendEx,
    Subscribe,
)

_SEND_EX_KEYS = frozenset(("command", "topic", "msg", "delivery", "cache", "ack", "id"))
_CONSUMER_KEYS = frozenset(("command", "topic", "ack", "prefetch"))
_BATCH_KEYS = frozenset(("command", "topic", "msgs", "delivery", "cache", "ack", "id"))
_JOB_KEYS = frozenset(("command", "topic", "index"))
_NACK_KEYS = frozenset(("command", "topic", "index", "delay"))


def _message_id(obj: dict[str, object]) -> str | None | Failure:
    if "id" not in obj:
        return None
    value = obj["id"]
    if type(value) is not str or not 1 <= len(value) <= MAX_ID_CHARS:
        return _MALFORMED
    return value


def _job_flags(obj: dict[str, object], delivery: object) -> tuple[bool, str | None] | Failure:
    """``ack`` and ``id`` of a send or batch: a job must be ``delivery: "one"``."""
    ack = obj.get("ack", False)
    if type(ack) is not bool or (ack and delivery != "one"):
        return _MALFORMED
    message_id = _message_id(obj)
    if isinstance(message_id, Failure):
        return message_id
    return ack, message_id


def validate_send_ex(obj: dict[str, object], raw: str) -> SendEx | Failure:
    """A ``send`` with ``ack`` and/or ``id`` (the base keys are already checked)."""
    if not _SEND_EX_KEYS.issuperset(obj):
        return _MALFORMED
    delivery = obj["delivery"]
    flags = _job_flags(obj, delivery)
    if isinstance(flags, Failure):
        return flags
    cache = obj.get("cache", True)
    try:
        encoded = raw.encode()
    except UnicodeEncodeError:
        encoded = b""
    return SendEx(cast(str, obj["topic"]), cast(str, obj["msg"]), cast(Delivery, delivery),
                  cast(bool, cache), encoded, flags[0], flags[1])


def validate_consumer(obj: dict[str, object]) -> Subscribe | Failure:
    """A ``subscribe`` with ``ack`` (a consumer) and maybe ``prefetch``."""
    ack = obj.get("ack")
    if ack is False and "prefetch" not in obj:
        # "ack": false is an ordinary subscribe: validated as one, without the key.
        from ._commands import validate

        rest = {k: v for k, v in obj.items() if k != "ack"}
        return cast(Subscribe | Failure, validate(rest))
    if ack is not True or not _CONSUMER_KEYS.issuperset(obj):
        return _MALFORMED
    prefetch = obj.get("prefetch", 1)
    if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
        return _MALFORMED
    return Subscribe(cast(str, obj["topic"]), ack=True, prefetch=prefetch)


def validate_ext(obj: dict[str, object], command: str, raw: str) -> Batch | JobCommand | Failure:
    """``batch``, ``ack``, ``nack``, ``progress``."""
    topic = obj.get("topic")
    if type(topic) is not str:
        return _MALFORMED
    if command == "batch":
        return _validate_batch(obj, topic)
    if not (_NACK_KEYS if command == "nack" else _JOB_KEYS).issuperset(obj):
        return _MALFORMED
    index = obj.get("index")
    if type(index) is not int or not 0 <= index <= INT_MAX:
        return _MALFORMED
    delay = obj.get("delay", 0)
    if type(delay) not in (int, float) or not 0 <= delay <= MAX_NACK_DELAY:  # type: ignore[operator]
        return _MALFORMED
    if command == "ack":
        return Ack(topic, index)
    if command == "progress":
        return Progress(topic, index)
    return Nack(topic, index, float(delay) if "delay" in obj else msgspec.UNSET)  # type: ignore[arg-type]


def _validate_batch(obj: dict[str, object], topic: str) -> Batch | Failure:
    if not _BATCH_KEYS.issuperset(obj):
        return _MALFORMED
    msgs = obj.get("msgs")
    delivery = obj.get("delivery")
    cache = obj.get("cache", True)
    if (
        type(msgs) is not list
        or not 1 <= len(msgs) <= MAX_BATCH
        or any(type(m) is not str for m in msgs)
        or (delivery != "all" and delivery != "one")
        or type(cache) is not bool
    ):
        return _MALFORMED
    flags = _job_flags(obj, delivery)
    if isinstance(flags, Failure):
        return flags
    return Batch(topic, tuple(msgs), delivery, cache, flags[0], flags[1])
