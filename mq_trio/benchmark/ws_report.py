"""The table of bench/ws_compare.sh: fan-out over WebSocket beside TCP and NATS, with the
ratios issue 16 (point 1) sets targets for.

    python -m mq_trio.benchmark.ws_report RESULTS.jsonl [...]

Reads the JSON lines of ``mq-trio bench --json`` runs (targets named "mq-trio",
"mq-trio over WebSocket", "nats", "nats over WebSocket") and prints Markdown.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MQ_TCP = "mq-trio"
MQ_WS = "mq-trio over WebSocket"
NATS_TCP = "nats"
NATS_WS = "nats over WebSocket"
COLUMNS = (MQ_TCP, MQ_WS, NATS_WS, NATS_TCP)


def load(paths: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _get(rows: list[dict[str, Any]], target: str, scenario: str, key: str,
         subscribers: int | None = None) -> float | None:
    for r in rows:
        if r["target"] != target or r["scenario"] != scenario or not r["ok"]:
            continue
        if subscribers is not None and r["params"].get("subscribers") != subscribers:
            continue
        value = r["metrics"].get(key)
        return float(value) if value is not None else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The fan-out and e2e tables and whether each target of issue 16 point 1 is met."""
    out = ["| fanout | " + " | ".join(f"{c} (msg/s)" for c in COLUMNS)
           + " | WS / TCP (mq-trio) | mq-trio WS / NATS WS |",
           "|---" * (len(COLUMNS) + 3) + "|"]
    subs = sorted({r["params"]["subscribers"] for r in rows if r["scenario"] == "fanout"})
    for s in subs:
        v = {c: _get(rows, c, "fanout", "per_s", s) for c in COLUMNS}
        out.append(f"| S={s} | " + " | ".join(_fmt(v[c]) for c in COLUMNS)
                   + f" | {_fmt(_ratio(v[MQ_WS], v[MQ_TCP]), 2)}x"
                   + f" | {_fmt(_ratio(v[MQ_WS], v[NATS_WS]), 2)}x |")
    out += ["", "| e2e p99 (µs) | " + " | ".join(COLUMNS) + " | WS / TCP (mq-trio) |",
            "|---" * (len(COLUMNS) + 2) + "|"]
    p99 = {c: _get(rows, c, "e2e", "p99_us") for c in COLUMNS}
    out.append("| p99 | " + " | ".join(_fmt(p99[c], 1) for c in COLUMNS)
               + f" | {_fmt(_ratio(p99[MQ_WS], p99[MQ_TCP]), 2)}x |")
    out += ["", "| target of issue 16, point 1 | measured | met |", "|---|---|---|"]
    ws, tcp, nats = (_get(rows, c, "fanout", "per_s", 100) for c in (MQ_WS, MQ_TCP, NATS_WS))
    checks = [
        ("fan-out S=100 over WebSocket >= 0.5x mq-trio's TCP fan-out", _ratio(ws, tcp), 0.5,
         None),
        ("fan-out S=100 over WebSocket >= NATS over WebSocket", _ratio(ws, nats), 1.0, None),
        ("e2e p99 to a WebSocket subscriber <= 1.5x TCP", _ratio(p99[MQ_WS], p99[MQ_TCP]),
         None, 1.5),
    ]
    for name, value, minimum, maximum in checks:
        if value is None:
            met = "not measured"
        elif (minimum is not None and value < minimum) or (
                maximum is not None and value > maximum):
            met = "no"
        else:
            met = "yes"
        out.append(f"| {name} | {_fmt(value, 2)}x | {met} |")
    failed = [f"{r['target']} {r['scenario']} {r['params']}: {'; '.join(r['errors'])}"
              for r in rows if not r["ok"]]
    if failed:
        out += ["", "Failed runs:", *(f"- {f}" for f in failed)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    print(markdown(load(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
