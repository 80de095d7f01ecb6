"""The wire dialects the generator speaks: protocol v1 (mq-trio and its family), Redis
pub/sub over RESP, and NATS's text protocol (issue 16 compares WebSocket fan-out with it).

The generator never decodes a reply it only has to count. Both dialects have replies and
deliveries of a fixed number of lines for the topics and messages the benchmark uses (no
newlines in either), so counting ``\\n`` (a C-speed ``bytes.count``) is enough; a token
counted across chunk boundaries tells deliveries from replies where they are mixed.
"""

from __future__ import annotations

import re

import attrs

from ..protocol import encode_send, encode_subscribe, frame

#: Timestamps travel as the first 20 characters of ``msg`` (zero-padded nanoseconds).
STAMP_DIGITS = 20


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def resp_command(*args: str) -> bytes:
    """A RESP array of bulk strings: how redis-cli sends a command."""
    parts = [b"*%d\r\n" % len(args)]
    parts.extend(_bulk(a.encode()) for a in args)
    return b"".join(parts)


@attrs.frozen
class Dialect:
    """How to talk to one kind of server, as fixed byte patterns."""

    name: str
    #: lines in the reply to one publish
    ack_lines: int
    #: lines in the reply to one subscribe (before any delivery)
    sub_confirm_lines: int
    #: lines in one delivery (for benchmark topics and messages)
    delivery_lines: int
    #: occurs exactly once in each delivery, never in a reply
    delivery_token: bytes
    #: occurs in an error reply, never in a success or a delivery
    error_token: bytes
    #: occurs once in each subscribe confirmation
    sub_token: bytes
    #: finds the stamp of each delivery in a buffer of whole deliveries
    stamp_re: re.Pattern[bytes]
    #: sent first on a connection that must publish while subscribed (Redis: RESP3)
    hello_for_mixed: bytes = b""

    # Both build one complete command, terminator included, through the protocol package
    # (mq) so the generator sends exactly what the client library does. Callers encode
    # once, outside their loops: these are not meant for a per-message hot path.

    def publish(self, topic: str, msg: str) -> bytes:
        """One publish to ``topic``, ready to write (``cmd * n`` pipelines n of them)."""
        if self.name == "redis":
            return resp_command("PUBLISH", topic, msg)
        if self.name == "redis-stream":
            # A durable topic's equivalent: the message kept in a capped stream.
            return resp_command("XADD", topic, "MAXLEN", str(STREAM_MAXLEN), "*", "m", msg)
        if self.name == "nats":
            data = msg.encode()
            return b"PUB %s %d\r\n%s\r\n" % (topic.encode(), len(data), data)
        return frame([encode_send(topic, msg)])

    def subscribe(self, topic: str) -> bytes:
        """One subscribe to ``topic`` (no replay options: the benchmark never resumes)."""
        if self.name == "redis":
            return resp_command("SUBSCRIBE", topic)
        if self.name == "nats":
            return b"SUB %s 1\r\n" % topic.encode()
        return frame([encode_subscribe(topic)])


MQ = Dialect(
    name="mq",
    ack_lines=1,
    sub_confirm_lines=1,
    delivery_lines=1,
    delivery_token=b'"index"',
    error_token=b"false",
    sub_token=b"true",
    stamp_re=re.compile(rb'"msg"\s*:\s*"(\d{20})'),
)

REDIS = Dialect(
    name="redis",
    ack_lines=1,  # ":<receivers>\r\n"
    sub_confirm_lines=6,  # *3 $9 subscribe $n topic :1
    delivery_lines=7,  # *3 $7 message $n topic $m msg
    delivery_token=b"message\r\n",
    error_token=b"-ERR",
    sub_token=b"subscribe\r\n",
    stamp_re=re.compile(rb"message\r\n\$\d+\r\n[^\r\n]*\r\n\$\d+\r\n(\d{20})"),
    # RESP2 forbids PUBLISH on a subscribed connection; RESP3 (Redis >= 6) allows it.
    hello_for_mixed=resp_command("HELLO", "3"),
)


#: The cache of a topic (mq-trio's default --cache-size) as a Redis stream's cap.
STREAM_MAXLEN = 100

#: Redis publishing into a stream per topic (``XADD topic MAXLEN 100 * m msg``), what a
#: durable topic does (index, cache, on disk): issue 16 compares durable publishing with
#: it under AOF. Publish only: its reply is the entry id, ``$n`` and the id.
REDIS_STREAM = attrs.evolve(REDIS, name="redis-stream", ack_lines=2)


#: NATS with ``verbose`` on: the server answers every command with ``+OK``, the same
#: one-line acknowledgement per publish as the other two dialects (the generator's
#: pipelining window counts acks). Its connections start with ``INFO`` and need a
#: ``CONNECT`` (``base.connect`` does both).
NATS = Dialect(
    name="nats",
    ack_lines=1,  # +OK
    sub_confirm_lines=1,  # +OK
    delivery_lines=2,  # MSG subject sid n, payload
    delivery_token=b"MSG ",
    error_token=b"-ERR",
    sub_token=b"+OK",
    stamp_re=re.compile(rb"MSG [^ \r\n]+ \d+ \d+\r\n(\d{20})"),
)

#: The CONNECT of a NATS connection that only subscribes: no +OK for every command.
NATS_CONNECT_QUIET = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'
#: The CONNECT of a NATS connection that publishes: +OK acknowledges each PUB.
NATS_CONNECT_VERBOSE = b'CONNECT {"verbose":true,"pedantic":false,"protocol":1}\r\n'


#: nats-server PINGs every client about 2 s after it connected (whatever ping_interval
#: says), and then every ping_interval: a subscriber must answer and not count it.
NATS_PING = b"PING\r\n"
NATS_PONG = b"PONG\r\n"


def dialect(name: str) -> Dialect:
    return {"redis": REDIS, "nats": NATS}.get(name, MQ)


@attrs.define
class TokenCounter:
    """Counts a token in a stream of chunks, including occurrences split across chunks."""

    token: bytes
    count: int = 0
    _tail: bytes = b""

    def feed(self, data: bytes) -> int:
        keep = len(self.token) - 1
        joined = self._tail + data if self._tail else data
        found = joined.count(self.token)
        self.count += found
        # The tail is too short to hold a whole token, so nothing is counted twice.
        self._tail = joined[-keep:] if keep else b""
        return found


@attrs.define
class StampReader:
    """Extracts the timestamps of whole deliveries from a stream of chunks."""

    pattern: re.Pattern[bytes]
    _buffer: bytes = b""

    def feed(self, data: bytes) -> list[int]:
        buf = self._buffer + data if self._buffer else data
        stamps: list[int] = []
        end = 0
        for m in self.pattern.finditer(buf):
            stamps.append(int(m.group(1)))
            end = m.end()
        rest = buf[end:]
        # Keep only what may be the start of an unfinished delivery.
        self._buffer = rest[-4096:] if len(rest) > 4096 else rest
        return stamps
