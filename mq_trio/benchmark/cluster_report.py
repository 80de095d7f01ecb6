"""The tables of bench/cluster_compare.sh: a two-node cluster's cross-node path (publisher
on node A, subscribers on node B) beside a single node and plain Redis pub/sub, the ratios
issue 15 (point 6) sets targets for, and the CPU each process spent per message.

    python -m mq_trio.benchmark.cluster_report RESULTS.jsonl [...]

Reads the JSON lines of ``mq-trio bench --json`` runs whose targets are named as below
(``SINGLE``, ``CLUSTER``, ``REDIS``) and prints Markdown. The cluster's runs carry the CPU
seconds of node A (``server``), node B (``sub server``) and the cluster's Redis (``redis``,
given with ``--cpu-pid redis=PID``) in ``cpu_s``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import SUB_SERVER

SINGLE = "single node"
CLUSTER = "cluster A->B"
REDIS = "redis"
COLUMNS = (SINGLE, CLUSTER, REDIS)
#: The names of the cluster's processes in ``cpu_s``, and how the tables show them.
PROCESSES = (("server", "node A (publisher's)"), (SUB_SERVER, "node B (subscribers')"),
             ("redis", "Redis (cluster's)"))
#: Issue 15's targets: cross-node fan-out at least this share of a single node's ...
FANOUT_SHARE = 1 / 3
#: ... and the cross-node e2e p99 under this (µs).
E2E_P99_US = 2000.0

Row = dict[str, Any]


def load(paths: Sequence[str]) -> list[Row]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def find(rows: list[Row], target: str, scenario: str, subscribers: int | None = None,
         key: str | None = None) -> Row | None:
    """The successful run of a target's scenario (and subscriber count): with several
    (rounds), the median one by ``key`` (default: the scenario's main figure)."""
    runs = [r for r in rows if r["target"] == target and r["scenario"] == scenario
            and r["ok"] and (subscribers is None
                             or r["params"].get("subscribers") == subscribers)]
    key = key or ("p99_us" if scenario == "e2e" else "per_s")
    runs = [r for r in runs if r["metrics"].get(key) is not None]
    if not runs:
        return None
    runs.sort(key=lambda r: float(r["metrics"][key]))
    return runs[(len(runs) - 1) // 2]  # the lower median: a run that happened


def rounds(rows: list[Row]) -> int:
    """How many runs the most repeated target and scenario had."""
    seen: dict[tuple[str, str, Any], int] = {}
    for r in rows:
        k = (r["target"], r["scenario"], r["params"].get("subscribers"))
        seen[k] = seen.get(k, 0) + 1
    return max(seen.values(), default=0)


def messages(r: Row) -> int | None:
    """Messages published in a run (publish: acknowledged; e2e: sent)."""
    m = r["metrics"]
    value = m.get("acked", m.get("published", m.get("sent")))
    return int(value) if value is not None else None


def cpu_us_per_message(r: Row | None, process: str, per_delivery: bool = False
                       ) -> float | None:
    """A process's CPU microseconds per published message (or per delivery)."""
    if r is None:
        return None
    cpu = r.get("cpu_s", {}).get(process)
    n = r["metrics"].get("delivered") if per_delivery else messages(r)
    if cpu is None or not n:
        return None
    return 1e6 * float(cpu) / int(n)


def _metric(r: Row | None, key: str) -> float | None:
    if r is None:
        return None
    value = r["metrics"].get(key)
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{suffix}"


def _subscriber_counts(rows: list[Row]) -> list[int]:
    return sorted({int(r["params"]["subscribers"]) for r in rows if r["scenario"] == "fanout"})


def throughput_table(rows: list[Row]) -> str:
    out = ["| scenario | " + " | ".join(COLUMNS) + f" | {CLUSTER} / {SINGLE} | "
           f"{CLUSTER} / {REDIS} |", "|---" * (len(COLUMNS) + 3) + "|"]
    lines: list[tuple[str, str, int | None, str, bool]] = [
        ("publish (acked msg/s)", "publish", None, "per_s", True)]
    lines += [(f"fanout S={s} (deliveries/s)", "fanout", s, "per_s", True)
              for s in _subscriber_counts(rows)]
    lines += [("e2e p50 (µs)", "e2e", None, "p50_us", False),
              ("e2e p99 (µs)", "e2e", None, "p99_us", False),
              ("e2e p99.9 (µs)", "e2e", None, "p999_us", False)]
    for label, scenario, subs, key, rate in lines:
        v = {c: _metric(find(rows, c, scenario, subs, key), key) for c in COLUMNS}
        digits = 0 if rate else 1
        out.append(f"| {label} | " + " | ".join(_fmt(v[c], digits) for c in COLUMNS)
                   + f" | {_fmt(_ratio(v[CLUSTER], v[SINGLE]), 2, 'x')}"
                   + f" | {_fmt(_ratio(v[CLUSTER], v[REDIS]), 2, 'x')} |")
    return "\n".join(out)


def cost_table(rows: list[Row]) -> str:
    """CPU µs per published message of each process, per scenario (and per delivery on
    the subscribers' node in fan-out)."""
    names = [label for _, label in PROCESSES]
    out = ["| scenario (cluster A->B) | msgs/s | " + " | ".join(names)
           + " | all three | node B per delivery | single node |",
           "|---" * (len(names) + 5) + "|"]
    runs: list[tuple[str, str, int | None]] = [("publish", "publish", None)]
    runs += [(f"fanout S={s}", "fanout", s) for s in _subscriber_counts(rows)]
    runs += [("e2e at a fixed rate", "e2e", None)]
    for label, scenario, subs in runs:
        r = find(rows, CLUSTER, scenario, subs)
        if r is None:
            continue
        costs = [cpu_us_per_message(r, p) for p, _ in PROCESSES]
        total = sum(c for c in costs if c is not None) if all(
            c is not None for c in costs) else None
        per_delivery = cpu_us_per_message(r, SUB_SERVER, per_delivery=True) if (
            scenario == "fanout") else None
        single = cpu_us_per_message(find(rows, SINGLE, scenario, subs), "server")
        rate = _metric(r, "achieved_rate") if scenario == "e2e" else None
        if rate is None and r["metrics"].get("seconds"):
            n = messages(r)
            rate = n / float(r["metrics"]["seconds"]) if n else None
        out.append(f"| {label} | {_fmt(rate)} | " + " | ".join(_fmt(c, 2) for c in costs)
                   + f" | {_fmt(total, 2)} | {_fmt(per_delivery, 2)} | {_fmt(single, 2)} |")
    return "\n".join(out)


def deliveries_per_cpu_second(r: Row | None) -> float | None:
    """Deliveries per CPU second of all the measured server processes of a run."""
    if r is None:
        return None
    cpu = sum(float(v) for v in r.get("cpu_s", {}).values())
    delivered = r["metrics"].get("delivered")
    return float(delivered) / cpu if cpu > 0 and delivered else None


def target_table(rows: list[Row]) -> str:
    """The targets, by throughput in this run and by CPU: deliveries per CPU second of all
    server processes (the cluster's three against the single node), which is what the
    throughput ratio is when every server saturates the one core they share, and which
    does not favour the side with more processes when others load that core too."""
    out = ["| target of issue 15, point 6 | throughput in this run | met | deliveries per "
           "CPU second (A + B + Redis vs single) | met |", "|---|---|---|---|---|"]
    for s in _subscriber_counts(rows):
        c_run, one_run = find(rows, CLUSTER, "fanout", s), find(rows, SINGLE, "fanout", s)
        c, one = _metric(c_run, "per_s"), _metric(one_run, "per_s")
        ratio = _ratio(c, one)
        c_cpu, one_cpu = deliveries_per_cpu_second(c_run), deliveries_per_cpu_second(one_run)
        cpu_ratio = _ratio(c_cpu, one_cpu)
        out.append(f"| cross-node fan-out S={s} >= 1/3 of a single node's | "
                   f"{_fmt(c)} vs {_fmt(one)} = {_fmt(ratio, 2, 'x')} | "
                   f"{_verdict(None if ratio is None else ratio >= FANOUT_SHARE)} | "
                   f"{_fmt(c_cpu)} vs {_fmt(one_cpu)} = {_fmt(cpu_ratio, 2, 'x')} | "
                   f"{_verdict(None if cpu_ratio is None else cpu_ratio >= FANOUT_SHARE)} |")
    p99 = _metric(find(rows, CLUSTER, "e2e"), "p99_us")
    out.append(f"| cross-node e2e p99 < {E2E_P99_US / 1000:g} ms | {_fmt(p99, 1, ' µs')} | "
               f"{_verdict(None if p99 is None else p99 < E2E_P99_US)} | | |")
    return "\n".join(out)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "yes" if met else "**no**"


def markdown(rows: list[Row]) -> str:
    """Throughput and latency with ratios, the CPU per message, the targets; failures."""
    n = rounds(rows)
    parts = [f"Each figure is the median of {n} rounds (runs of all scenarios in turn); "
             "the CPU per message is that of the median run." if n > 1 else "",
             throughput_table(rows),
             "CPU per published message (µs; `cpu_s` over the measured window divided by "
             "the messages published; node B's per delivery in its own column):",
             cost_table(rows), target_table(rows)]
    saturated = list(dict.fromkeys(f"{r['target']} {r['scenario']} {r['params']}"
                                   for r in rows if r.get("saturated")))
    if saturated:
        parts.append("Generator saturated (a lower bound): "
                     + "; ".join(saturated))
    failed = [f"{r['target']} {r['scenario']} {r['params']}: {'; '.join(r['errors'])}"
              for r in rows if not r["ok"]]
    if failed:
        parts.append("Failed runs:\n" + "\n".join(f"- {f}" for f in failed))
    return "\n\n".join(p for p in parts if p)


BEGIN = "<!-- cluster-bench:begin -->"
END = "<!-- cluster-bench:end -->"
SECTION = "## Cluster (issue #15)"


def splice(path: Path, block: str) -> None:
    """Put ``block`` between the markers of ``path`` (the prose around them stays); without
    markers, append a new section holding them."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    wrapped = f"{BEGIN}\n\n{block.strip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + wrapped + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{wrapped}\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mq_trio.benchmark.cluster_report",
                                description="Markdown tables of bench/cluster_compare.sh.")
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl")
    p.add_argument("--splice", default=None, metavar="MARKDOWN",
                   help=f"also write the tables (after --header) between {BEGIN} and {END} "
                   "of this file (appending a section if it has none)")
    p.add_argument("--header", default="", help="text before the tables (--splice only)")
    args = p.parse_args(argv)
    text = markdown(load(args.results))
    print(text)
    if args.splice:
        splice(Path(args.splice), (args.header.strip() + "\n\n" + text).strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
