"""The client's side of the work-queue extensions (docs/protocol.md, "Acknowledged jobs",
"Atomic batches", "Idempotent publishing"): their commands' encoders and their values.

The encoders live here rather than in ``mq_trio.protocol`` so the client does not depend
on the server's parser and encoder modules changing with it; they write what
``json.dumps`` writes for the command's dict (default separators, ASCII with ``\\u``
escapes, optional keys left out at their defaults), as ``encode_send`` does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from ..protocol import Delivery

if TYPE_CHECKING:
    from ._client import Client

#: The protocol's bounds (docs/protocol.md), checked here so a caller is told at once
#: rather than getting ``Malformed json message`` back.
MAX_ID_CHARS = 256
MAX_BATCH = 10_000
MAX_PREFETCH = 10_000
MAX_NACK_DELAY = 86_400.0

#: The failure texts the client turns into their own exceptions.
UNKNOWN_JOB = "Unknown job"
QUEUE_FULL = "Queue full"


def new_id() -> str:
    """A fresh message id: 32 hex digits, unique without coordination (uuid4)."""
    return uuid.uuid4().hex


def check_id(id: str) -> str:
    if type(id) is not str or not 1 <= len(id) <= MAX_ID_CHARS:
        raise ValueError(f"an id is a string of 1 to {MAX_ID_CHARS} characters, not {id!r}")
    return id


def _check_delivery(delivery: Delivery, ack: bool) -> None:
    if delivery != "all" and delivery != "one":
        raise ValueError(f"delivery must be 'all' or 'one', not {delivery!r}")
    if ack and delivery != "one":
        raise ValueError("a job (ack=True) needs delivery='one'")


def encode_publish(
    topic: str,
    msg: str,
    delivery: Delivery = "all",
    cache: bool = True,
    ack: bool = False,
    id: str | None = None,
) -> bytes:
    """A ``send`` with the extensions' keys (``ack``, ``id``) when given."""
    _check_delivery(delivery, ack)
    obj: dict[str, object] = {"command": "send", "topic": topic, "msg": msg,
                              "delivery": delivery}
    if not cache:
        obj["cache"] = False
    if ack:
        obj["ack"] = True
    if id is not None:
        obj["id"] = check_id(id)
    return json.dumps(obj).encode("ascii")


def encode_batch(
    topic: str,
    msgs: Sequence[str],
    delivery: Delivery = "all",
    cache: bool = True,
    ack: bool = False,
    id: str | None = None,
) -> bytes:
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


def check_prefetch(prefetch: int) -> int:
    if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
        raise ValueError(f"prefetch is an integer from 1 to {MAX_PREFETCH}, not {prefetch!r}")
    return prefetch


def encode_consume(topic: str, prefetch: int = 1) -> bytes:
    """A consumer's ``subscribe``: ``"ack": true`` and its prefetch."""
    obj = {"command": "subscribe", "topic": topic, "ack": True,
           "prefetch": check_prefetch(prefetch)}
    return json.dumps(obj).encode("ascii")


def encode_job_command(
    command: str, topic: str, index: int, delay: float | None = None
) -> bytes:
    """``ack``, ``nack`` (``delay`` in seconds, left out when 0) or ``progress``."""
    obj: dict[str, object] = {"command": command, "topic": topic, "index": index}
    if delay:
        if not 0 <= delay <= MAX_NACK_DELAY or delay != delay:
            raise ValueError(f"a nack delay is 0 to {MAX_NACK_DELAY:g} seconds, not {delay!r}")
        obj["delay"] = delay
    return json.dumps(obj).encode("ascii")


# --- values ---------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Published:
    """What the server answered a publish with an id (or a job, or a batch).

    ``index``: the message's index (a batch's first; the others follow it). ``count``:
    how many messages (1, or a batch's size). ``duplicate``: the id had been accepted
    already (within the server's ``--dedupe-window``), so this copy was neither stored
    nor delivered again; ``index`` is the original's.
    """

    index: int
    count: int = 1
    duplicate: bool = False


@attrs.define(eq=False, slots=True)
class Job:
    """A job delivered to a consumer (``client.consume(topic)``): do it, then ``ack``.

    ``deliveries``: how many times the server has delivered it, this time included (more
    than 1: an earlier consumer did not finish it). A job taken from a dead-letter topic
    (``$dead.TOPIC``) also says where it came from (``from_topic``, ``from_index``).

    The server keeps the job until it is acknowledged; without an ack it is delivered
    again when this connection drops, on ``nack``, or after the server's
    ``--ack-timeout`` (``in_progress()`` restarts that clock).
    """

    topic: str
    index: int
    msg: str
    deliveries: int
    from_topic: str | None = None
    from_index: int | None = None
    _client: Client | None = attrs.field(default=None, repr=False, alias="client")
    #: The connection the job came on: only that connection may settle it.
    _generation: int = attrs.field(default=0, repr=False, alias="generation")

    async def ack(self) -> None:
        """Done: the server forgets the job. Raises :class:`UnknownJob` if it is no
        longer this client's (its deadline passed, or the connection it came on was lost:
        it was or will be delivered again, maybe to another consumer)."""
        await self._settle("ack")

    async def nack(self, delay: float = 0) -> None:
        """Not done: back to the queue, now or after ``delay`` seconds (to 86400), ahead
        of jobs never delivered. Raises :class:`UnknownJob` as ``ack`` does."""
        await self._settle("nack", delay)

    async def in_progress(self) -> None:
        """Still working on it: the server's ack deadline starts again. Raises
        :class:`UnknownJob` as ``ack`` does."""
        await self._settle("progress")

    async def _settle(self, command: str, delay: float | None = None) -> None:
        if self._client is None:
            raise RuntimeError("this Job was not delivered by a client")
        line = encode_job_command(command, self.topic, self.index, delay)
        await self._client._settle_job(line, self.topic, self._generation)
