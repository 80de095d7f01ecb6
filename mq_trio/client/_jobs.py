"""The client's side of the work-queue extensions (docs/protocol.md, "Acknowledged jobs",
"Atomic batches", "Idempotent publishing"): ids and the values a client gets. The
commands' encoders are the protocol package's (``encode_publish``, ``encode_batch``,
``encode_consume``, ``encode_job_command``), as for every other command."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import attrs

from ..protocol import encode_job_command

if TYPE_CHECKING:
    from ._client import Client


def new_id() -> str:
    """A fresh message id: 32 hex digits, unique without coordination (uuid4)."""
    return uuid.uuid4().hex


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
