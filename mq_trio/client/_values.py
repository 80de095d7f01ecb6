"""The client's plain values: errors, deliveries, gaps, reconnection policy, targets.

Kept apart from the connection machinery (``_client``) so that the byte carriers
(``_wire``) can raise ``ConnectError`` and take a ``Target`` without importing it.
"""

from __future__ import annotations

import random
from typing import Literal
from urllib.parse import urlsplit

import attrs

from ..protocol import Delivery

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000


# --- errors ------------------------------------------------------------------------------


class MQError(Exception):
    """A command failed; ``reason`` is the server's failure text (docs/protocol.md, "Replies")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectError(MQError):
    """The client could not connect to the server (raised by ``open_client``)."""


class ConnectionLost(MQError):
    """The connection ended (or the client closed) before the command got its reply.

    A ``send`` that raises this may or may not have been published; the server cannot
    say, so the client does not resend it.
    """


class AuthError(ConnectError):
    """The server refused the client's credentials (``open_client(token=...)`` or
    ``user=``/``password=``): ``reason`` is the server's text, ``"Authentication failed"``.

    A :class:`ConnectError`, since the connection could not be used; never retried with the
    same credentials. The credentials themselves are never part of the message.
    """


class UnknownJob(MQError):
    """The server no longer gives this connection the job (``Unknown job``): it was
    acknowledged already, its ack deadline passed, or the connection it was delivered on
    was lost. It has gone (or will go) back to the queue, so someone else may be doing it
    now: not a failure of the work, but its result will not be counted as the ack."""


class QueueFull(MQError):
    """The server refused a job or batch of jobs (``Queue full``): nothing was accepted
    and no index consumed; retry later."""


class SpoolFull(MQError):
    """The spool (``open_client(spool=...)``) holds ``spool_max_bytes`` of unacknowledged
    publishes: this one was not taken. Nothing was sent; wait for replies and retry."""


# --- values ------------------------------------------------------------------------------

@attrs.frozen(slots=True)
class Message:
    """One delivery: a message published to a topic this client subscribed to."""

    topic: str
    msg: str
    #: The topic's message index (increasing per topic, never reused by the server).
    index: int
    delivery: Delivery = "all"


@attrs.frozen(slots=True)
class Gap:
    """A resume that could not cover everything (``open_client(..., epoch=True)``).

    ``"history lost"``: the server's epoch changed (e.g. an in-memory server restarted),
    so messages after ``last_seen`` of the old history may be gone; the client resumed
    from the start of the new history. ``"evicted"``: same history, but messages after
    ``last_seen`` fell out of the cache before the client came back.
    """

    topic: str
    last_seen: int
    reason: Literal["history lost", "evicted"]


@attrs.frozen(slots=True)
class ConnectionEvent:
    """What ``open_client(..., on_event=...)`` is told while it reconnects.

    ``"lost"``: a connection that was up ended and the client will try again (``reason``
    says why). ``"reconnected"``: a new connection is up (``attempts`` it took), before
    the subscriptions are resumed. ``"gap"``: a resume could not cover everything
    (``gap``; only with ``epoch=True``).
    """

    kind: Literal["lost", "reconnected", "gap"]
    reason: str = ""
    attempts: int = 0
    gap: Gap | None = None


@attrs.frozen
class Backoff:
    """How ``open_client(..., reconnect=True)`` spaces its reconnection attempts.

    The first attempt after a drop waits about ``initial``; each consecutive failure
    (a failed attempt, or a connection that dropped within ``maximum`` seconds) multiplies
    the delay up to ``maximum``, with jitter. After ``max_attempts`` consecutive failed
    attempts to connect (``None``: never) the client gives up and every waiting call
    raises :class:`ConnectionLost`.
    """

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next attempt after ``failures`` failures in a row."""
        if failures <= 0:
            return 0.0
        base = min(self.maximum, self.initial * self.multiplier ** (failures - 1))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto


@attrs.frozen
class Target:
    """Where to connect: ``host:port`` over TCP, or a ``ws://``/``wss://`` URL."""

    host: str
    port: int
    url: str | None = None

    def __str__(self) -> str:
        return self.url if self.url is not None else f"{self.host}:{self.port}"


def parse_target(host_or_url: str, port: int | None = None) -> Target:
    """``("127.0.0.1", 7000)``, ``"ws://127.0.0.1:7001/"`` or ``"tcp://127.0.0.1:7000"``."""
    if "://" not in host_or_url:
        if host_or_url.count(":") == 1:  # (an IPv6 address has more than one)
            raise ValueError(
                f"{host_or_url!r} is not a host name: give the port apart, or a URL "
                f"(tcp://{host_or_url} or ws://{host_or_url}/)"
            )
        return Target(host_or_url or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
    if port is not None:
        raise ValueError("give either a URL or a host and a port, not both")
    parts = urlsplit(host_or_url)
    scheme = parts.scheme.lower()
    try:
        url_port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {host_or_url!r}") from exc
    host = parts.hostname or DEFAULT_HOST
    if scheme in ("ws", "wss"):
        default = 443 if scheme == "wss" else 80
        return Target(host, url_port or default, url=host_or_url)
    if scheme == "tcp":
        return Target(host, url_port or DEFAULT_PORT)
    raise ValueError(f"unsupported URL scheme {scheme!r} (use ws://, wss:// or tcp://)")
