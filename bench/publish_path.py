"""CPU cost of the per-message publish path, without sockets: parse a send line, publish it.

    python bench/publish_path.py

Per line (131 bytes, ``{"command": "send", "topic": "bench", "msg": "<64 x>",
"delivery": "all"}``), best of several timeit runs over 1000 lines: ``parse_line``,
``Broker.publish`` (MemoryHistory, cache on, cache full so every publish evicts) with 0, 1
and 10 subscribers (list appends), both together, and a subscribe replaying 50 messages.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from mq_trio import protocol
from mq_trio.broker import Broker, MemoryHistory

LINES = 1000


class Sink:
    """A subscriber as cheap as an outbox's list append."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def push(self, payload: bytes) -> None:
        self.items.append(payload)


def per_line(fn: Callable[[], object], number: int = 200) -> float:
    """Microseconds per line, best of 7."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number / LINES * 1e6


def with_subscribers(lines: list[bytes], count: int) -> tuple[float, float]:
    """(publish, parse + publish) per line with ``count`` subscribers on the topic."""
    parse = protocol.parse_line
    sends = [parse(x) for x in lines]
    broker = Broker(MemoryHistory(100))
    sinks = [Sink() for _ in range(count)]
    for sink in sinks:
        broker.subscribe(sink, "bench")
    publish = broker.publish

    def publish_all() -> None:
        for send in sends:
            publish(send)  # type: ignore[arg-type]
        for sink in sinks:
            sink.items.clear()

    def parse_and_publish() -> None:
        for x in lines:
            publish(parse(x))  # type: ignore[arg-type]
        for sink in sinks:
            sink.items.clear()

    return per_line(publish_all), per_line(parse_and_publish)


def main() -> None:
    line = json.dumps(
        {"command": "send", "topic": "bench", "msg": "x" * 64, "delivery": "all"}
    ).encode()
    lines = [bytes(line) for _ in range(LINES)]
    parse = protocol.parse_line
    print(f"parse_line                      {per_line(lambda: [parse(x) for x in lines]):.3f} us")
    for count in (0, 1, 10):
        publish, both = with_subscribers(lines, count)
        print(f"publish, {count:2d} subscribers          {publish:.3f} us")
        print(f"parse + publish, {count:2d} subscribers  {both:.3f} us")
    broker = Broker(MemoryHistory(100))
    for x in lines:
        broker.publish(parse(x))  # type: ignore[arg-type]

    def replays() -> None:
        for _ in range(LINES):
            broker.subscribe(Sink(), "bench", 49)

    print(f"subscribe replaying 50 messages {per_line(replays, 20):.3f} us")


if __name__ == "__main__":
    main()
