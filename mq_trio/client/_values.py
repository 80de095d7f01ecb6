"""The client's plain values: errors, deliveries, gaps, reconnection policy, targets.

Kept apart from the connection machinery (``_client``) so that the byte carriers
(``_wire``) can raise ``ConnectError`` and take a ``Target`` without importing it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, TypeAlias
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
    says why). ``"reconnected"``: a new connection is up (``attempts`` it took, every
    address tried counting one), before the subscriptions are resumed. ``"gap"``: a
    resume could not cover everything (``gap``; only with ``epoch=True``).

    ``target``: the server's address: the one lost, the one reconnected to (with several
    addresses, maybe another one), the one resumed on.
    """

    kind: Literal["lost", "reconnected", "gap"]
    reason: str = ""
    attempts: int = 0
    gap: Gap | None = None
    target: Target | None = None


@attrs.frozen
class Backoff:
    """How ``open_client(..., reconnect=True)`` spaces its reconnection attempts.

    The first attempt after a drop waits about ``initial``; each consecutive failure
    (a failed attempt, or a connection that dropped within ``maximum`` seconds) multiplies
    the delay up to ``maximum``, with jitter. After ``max_attempts`` consecutive failed
    attempts to connect (``None``: never) the client gives up and every waiting call
    raises :class:`ConnectionLost`.

    With several server addresses an attempt is a round: every address tried once, one
    after the other without waiting; the delay is between rounds.
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
    """Where to connect: ``host:port`` over TCP, or a ``ws://``/``wss://`` URL.

    ``str()`` gives ``host:port`` (``[v6 address]:port``) or the URL."""

    host: str
    port: int
    url: str | None = None

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


#: The forms ``open_client`` takes for its address(es): one string (which may hold
#: several addresses separated by commas), or a sequence of them.
Addresses: TypeAlias = "str | Sequence[str]"


def _check_port(port: int, text: str) -> int:
    if not 0 < port <= 65535:
        raise ValueError(f"bad port in {text!r} (1-65535)")
    return port


def _parse_address(text: str, default_port: int | None) -> tuple[Target, bool]:
    """One address: a URL, ``host:port``, ``[v6]:port``, or a host (``default_port``, else
    7000). Also says whether the address named its own port (or is a URL)."""
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        try:
            url_port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {text!r}") from exc
        host = parts.hostname or DEFAULT_HOST
        if scheme in ("ws", "wss"):
            default = 443 if scheme == "wss" else 80
            return Target(host, url_port or default, url=text), True
        if scheme == "tcp":
            return Target(host, url_port or DEFAULT_PORT), True
        raise ValueError(f"unsupported URL scheme {scheme!r} in {text!r} (use ws://, wss:// "
                         "or tcp://)")
    host, port_text = text, None
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            raise ValueError(f"bad address {text!r}: an IPv6 address in brackets is "
                             "[ADDRESS] or [ADDRESS]:PORT")
        host, rest = text[1:end], text[end + 1:]
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:  # (a bare IPv6 address has more than one: no port)
        host, port_text = text.split(":")
    if port_text is not None:
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        return Target(host or DEFAULT_HOST, _check_port(int(port_text), text)), True
    port = DEFAULT_PORT if default_port is None else default_port
    return Target(host or DEFAULT_HOST, port), False


def parse_target(host_or_url: str, port: int | None = None) -> Target:
    """One address: ``("127.0.0.1", 7000)``, ``"127.0.0.1:7000"``, ``"[::1]:7000"``,
    ``"ws://127.0.0.1:7001/"``, ``"wss://..."`` or ``"tcp://127.0.0.1:7000"``. ``port``
    only goes with a bare host (default 7000)."""
    target, own_port = _parse_address(host_or_url.strip(), port)
    if own_port and port is not None:
        raise ValueError(f"{host_or_url!r} names its port: give either an address with "
                         "its port (or a URL) or a host and a port, not both")
    return target


def parse_targets(addresses: Addresses, port: int | None = None) -> tuple[Target, ...]:
    """The addresses ``open_client`` is given, in order: one string, where commas
    separate several (``"127.0.0.1:7000,127.0.0.1:7002"``), or a sequence of strings
    (each may hold several too). Each address is what :func:`parse_target` takes; in a
    list of several, ``port`` is the port of the hosts that name none (else 7000).

    A string without a comma is one address under :func:`parse_target`'s rules (a URL
    or ``host:port`` and a ``port`` together are an error). ValueError for an empty list,
    an empty entry or a bad address; TypeError for something else than strings."""
    if isinstance(addresses, str):
        if "," not in addresses:
            return (parse_target(addresses, port),)
        items = [addresses]
    elif isinstance(addresses, Sequence) and all(isinstance(a, str) for a in addresses):
        items = list(addresses)
        if not items:
            raise ValueError("no server address given (an empty list)")
    else:
        raise TypeError(f"server addresses are a string or a list of strings, not "
                        f"{addresses!r}")
    texts = [part.strip() for item in items for part in item.split(",")]
    if "" in texts:
        raise ValueError(f"an empty address in {','.join(items)!r} (two commas in a row, "
                         "or one at an end?)")
    return tuple(_parse_address(text, port)[0] for text in texts)
