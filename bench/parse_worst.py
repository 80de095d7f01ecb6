"""The worst lines for the parser: time per line, fast path and stdlib path.

    python bench/parse_worst.py [--size BYTES]

Each line is at most --size bytes (default 1 MiB, the default --max-line-bytes). A line
is parsed once per run, best of 5 runs (a parse holds the event loop for that long);
every figure should stay within a few milliseconds (issue #11).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from mq_trio.protocol import LineEvent, parse_line, parse_line_stdlib

HEAD = b'{"command": "send", "topic": "t", "delivery": "all", "msg": '
SUB = b'{"command": "subscribe", "topic": "t", "last_seen": '


def cases(n: int) -> dict[str, bytes]:
    """Name -> line, each at most ``n`` bytes."""
    def fill(unit: bytes, head: bytes = b"[", tail: bytes = b"]") -> bytes:
        k = (n - len(head) - len(tail)) // len(unit)
        return head + unit * k + tail

    return {
        "digits": b"1" * n,
        "digits in last_seen": fill(b"9", SUB, b"}"),
        "digits in msg": fill(b"9", HEAD, b"}"),
        "19-digit ints in array": fill(b"1234567890123456789,", b"[", b"1]"),
        "small ints in array": fill(b"1,", b"[", b"1]"),
        "float long mantissa": fill(b"1", b"0.", b""),
        "float long exponent": fill(b"1", b"1e", b""),
        "float long exponent in msg": fill(b"9", HEAD + b"1e", b"}"),
        "floats 1.5e300": fill(b"1.5e300,", b"[", b"1]"),
        "deep arrays (valid)": b"[" * (n // 2) + b"]" * (n // 2),
        "deep arrays (invalid)": b"[" * n,
        "deep objects": fill(b'{"a":', b"", b"1") + b"}" * 0,
        "nested 500 repeated": fill(b"[" * 500 + b"]" * 500 + b",", b"[", b"1]"),
        "empty arrays": fill(b"[],", b"[", b"[]]"),
        "many keys": fill(b'"k":1,', b"{", b'"k":1}'),
        "many keys, dup send keys": fill(b'"cache":true,', HEAD[:-7] + b'"msg":"m",', b'"a":1}'),
        "\\u escapes in msg": fill(b"\\u00e9", HEAD + b'"', b'"}'),
        "\\ud800 escapes in msg": fill(b"\\ud800", HEAD + b'"', b'"}'),
        "\\\" escapes in msg": fill(b'\\"', HEAD + b'"', b'"}'),
        "NaN array": fill(b"NaN,", b"[", b"NaN]"),
        "strings array": fill(b'"a",', b"[", b'"a"]'),
        "long topic subscribe": fill(b"a", b'{"command": "subscribe", "topic": "', b'"}'),
        "invalid UTF-8 spread": fill(b"a\xff", HEAD + b'"', b'"}'),
        "invalid UTF-8 at end": fill(b"a", HEAD + b'"', b'\xff"}'),
    }


def best_ms(fn: Callable[[bytes], LineEvent], line: bytes, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(line)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes per line (default 1 MiB)")
    args = ap.parse_args()
    print(f"{'line (' + str(args.size) + ' bytes)':32} {'parse_line':>11} {'stdlib':>9}  reply")
    worst = 0.0
    for name, line in cases(args.size).items():
        assert len(line) <= args.size, name
        fast = best_ms(parse_line, line)
        std = best_ms(parse_line_stdlib, line)
        worst = max(worst, fast, std)
        reply = parse_line(line)
        shown = type(reply).__name__ if reply is None or not hasattr(reply, "reason") else reply.reason  # noqa: E501
        print(f"{name:32} {fast:8.2f} ms {std:6.2f} ms  {shown}")
    print(f"{'worst':32} {worst:8.2f} ms")


if __name__ == "__main__":
    main()
