"""Presenting results: terminal table, JSON lines, PNG plot, Markdown, target checks."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from .scenarios import Result

MQ_NAME = "mq-trio"
#: The second server of ``mq-trio bench --compare-auth``: the same, with --auth.
AUTH_NAME = "mq-trio+auth"
REDIS_NAME = "redis"
#: The name of the ``--sub-port`` server's CPU figures in ``Result.cpu_s``.
SUB_SERVER = "sub server"
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def params_text(r: Result) -> str:
    p = r.params
    if r.scenario == "publish":
        return f"P={p['publishers']} window={p['window']}"
    if r.scenario == "fanout":
        return f"S={p['subscribers']}"
    if r.scenario == "e2e":
        return f"{p['rate']}/s"
    if r.scenario == "conns":
        return f"C={p['conns']}"
    if r.scenario == "queue":
        return f"P={p['producers']} C={p['consumers']} prefetch={p['prefetch']}"
    return f"{p.get('size', '')}B msg"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def result_text(r: Result) -> str:
    m = r.metrics
    if not m:
        return "-"
    if r.scenario in ("rtt", "e2e"):
        if not m.get("n"):
            return "no samples"
        return f"p50 {_num(m['p50_us'])} / p99 {_num(m['p99_us'])} / p99.9 {_num(m['p999_us'])} µs"
    if r.scenario == "publish":
        return f"{m['per_s']:,} acked msg/s"
    if r.scenario == "fanout":
        return f"{m['per_s']:,} delivered msg/s"
    if r.scenario == "queue":
        text = f"{m['per_s']:,} acked jobs/s"
        if m.get("n"):
            text += f", latency p50 {_num(m['p50_us'])} / p99 {_num(m['p99_us'])} µs"
        return text
    if r.scenario == "conns":
        text = f"setup {m['setup_s']:.2f} s, delivery {m['delivery_s']:.2f} s"
        if "rss_per_conn_kib" in m:
            text += f", {m['rss_per_conn_kib']:.1f} KiB/conn"
        return text
    return json.dumps(m)


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}%"


def note_text(r: Result) -> str:
    notes = []
    if r.saturated:
        notes.append("GENERATOR SATURATED")
    notes.extend(r.errors)
    return "; ".join(notes)


HEADERS = ("scenario", "params", "target", "result", "gen CPU", "server CPU", "note")


def rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    return [
        (r.scenario, params_text(r), r.target, result_text(r), _pct(r.gen_cpu_pct),
         _pct(r.server_cpu_pct), note_text(r))
        for r in results
    ]


def table(results: Sequence[Result]) -> str:
    body = rows(results)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in body]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(out)


def write_json_lines(results: Sequence[Result], stream: IO[str]) -> None:
    for r in results:
        stream.write(json.dumps(r.to_json()) + "\n")


# --- targets ----------------------------------------------------------------------------


@attrs.frozen
class Check:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def _find(results: Sequence[Result], target: str, scenario: str, **params: Any
          ) -> Result | None:
    for r in results:
        if r.target == target and r.scenario == scenario and all(
            r.params.get(k) == v for k, v in params.items()
        ):
            return r
    return None


def _ratio_check(name: str, want: str, mq: Result | None, redis: Result | None, key: str,
                 minimum: float | None = None, maximum: float | None = None,
                 unit: str = "") -> Check:
    if mq is None or redis is None or key not in mq.metrics or key not in redis.metrics:
        return Check(name, want, "not measured", None)
    a, b = mq.metrics[key], redis.metrics[key]
    ratio = a / b if b else float("inf")
    met = (minimum is None or ratio >= minimum) and (maximum is None or ratio <= maximum)
    met = met and mq.ok and redis.ok
    return Check(name, want, f"{_num(a)}{unit} vs {_num(b)}{unit} = {ratio:.2f}x", met)


def check_targets(results: Sequence[Result]) -> list[Check]:
    """The issue's targets, as ratios of mq-trio to Redis measured in the same run."""
    mq = MQ_NAME
    rd = REDIS_NAME
    checks = [
        _ratio_check("publish P=1 throughput", ">= 0.3x Redis",
                     _find(results, mq, "publish", publishers=1),
                     _find(results, rd, "publish", publishers=1), "per_s", minimum=0.3,
                     unit=" msg/s"),
        _ratio_check("fanout S=100 delivered throughput", ">= 0.3x Redis",
                     _find(results, mq, "fanout", subscribers=100),
                     _find(results, rd, "fanout", subscribers=100), "per_s", minimum=0.3,
                     unit=" msg/s"),
    ]
    e2e_mq = _find(results, mq, "e2e")
    e2e = _ratio_check("e2e p99", "<= 1.5x Redis and < 500 µs", e2e_mq,
                       _find(results, rd, "e2e"), "p99_us", maximum=1.5, unit=" µs")
    if e2e.met and e2e_mq is not None:
        e2e = attrs.evolve(e2e, met=e2e_mq.metrics["p99_us"] < 500)
    checks.append(e2e)
    checks.append(_ratio_check("rtt p50", "<= 1.2x Redis", _find(results, mq, "rtt"),
                               _find(results, rd, "rtt"), "p50_us", maximum=1.2, unit=" µs"))
    conns = _find(results, mq, "conns")
    if conns is None or not conns.metrics:
        checks.append(Check("conns: RSS per connection", "<= 8 KiB", "not measured", None))
        checks.append(Check("conns: setup / delivery", "< 2 s each", "not measured", None))
    else:
        m = conns.metrics
        n = conns.params["conns"]
        if "rss_per_conn_kib" in m:
            checks.append(Check(f"conns C={n}: RSS per connection", "<= 8 KiB",
                                f"{m['rss_per_conn_kib']:.2f} KiB", m["rss_per_conn_kib"] <= 8))
        else:
            checks.append(Check("conns: RSS per connection", "<= 8 KiB",
                                "server pid unknown", None))
        checks.append(Check(f"conns C={n}: setup / delivery", "< 2 s each",
                            f"{m['setup_s']:.2f} s / {m['delivery_s']:.2f} s",
                            m["setup_s"] < 2 and m["delivery_s"] < 2 and conns.ok))
    return checks


def checks_rows(checks: Sequence[Check]) -> list[tuple[str, str, str, str]]:
    verdict = {True: "met", False: "NOT met", None: "-"}
    return [(c.name, c.target, c.measured, verdict[c.met]) for c in checks]


def auth_checks(results: Sequence[Result]) -> list[Check]:
    """``--compare-auth``: publish throughput with auth within 10% of without (#12)."""
    checks = []
    for r in results:
        if r.target == AUTH_NAME and r.scenario == "publish":
            p = r.params["publishers"]
            checks.append(_ratio_check(
                f"publish P={p} throughput with auth", ">= 0.9x without", r,
                _find(results, MQ_NAME, "publish", publishers=p), "per_s", minimum=0.9,
                unit=" msg/s"))
    return checks


def checks_table(checks: Sequence[Check], versus: str = "mq-trio vs Redis") -> str:
    body = checks_rows(checks)
    heads = ("target", "wanted", f"measured ({versus})", "")
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
    return "\n".join(out)


# --- queue: mq-trio vs Redis Streams, per mode ---------------------------------------------

#: issue 14: acknowledged jobs per second, mq-trio vs Redis Streams in the same mode
QUEUE_TARGET = 0.5

QUEUE_HEADERS = ("Redis Streams", "jobs/s", "p50", "p99", "mq-trio", "jobs/s", "p50", "p99",
                 "mq-trio / Redis", f">= {QUEUE_TARGET}x")


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:,.1f} ms" if us >= 1000 else f"{us:,.0f} µs"


def queue_pairs(results: Sequence[Result]) -> list[tuple[Result, Result]]:
    """(Redis, mq-trio) queue results: each mq-trio one with the Redis one run just
    before it (bench/queue_compare.sh runs them in that order, one mode after the other)."""
    pairs = []
    redis: Result | None = None
    for r in results:
        if r.scenario != "queue":
            continue
        if r.params.get("server") == "redis":
            redis = r
        elif redis is not None:
            pairs.append((redis, r))
            redis = None
    return pairs


def queue_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for rd, mq in queue_pairs(results):
        a, b = mq.metrics.get("per_s"), rd.metrics.get("per_s")
        if a is None or not b or not (mq.ok and rd.ok):
            ratio, met = "-", "not measured"
            problems = [f"{x.target}: {note_text(x)}" for x in (rd, mq) if not x.ok]
            if problems:
                met = "; ".join(problems)
        else:
            ratio = f"{a / b:.2f}x"
            met = "met" if a / b >= QUEUE_TARGET else "NOT met"
            if rd.saturated or mq.saturated:
                met += " (generator saturated)"
        rows.append((
            rd.target, f"{b or 0:,}", _ms(rd.metrics.get("p50_us")),
            _ms(rd.metrics.get("p99_us")), mq.target, f"{a or 0:,}",
            _ms(mq.metrics.get("p50_us")), _ms(mq.metrics.get("p99_us")), ratio, met,
        ))
    return rows


def queue_summary(results: Sequence[Result], markdown: bool = False) -> str:
    """The table of bench/queue_compare.sh: both servers and their ratio, per mode."""
    body = queue_rows(results)
    if markdown:
        return markdown_table(QUEUE_HEADERS, body)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(QUEUE_HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(QUEUE_HEADERS, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in body]
    return "\n".join(lines)


def read_json_lines(path: str | os.PathLike[str]) -> list[Result]:
    """Results written by ``--json`` (without latency samples)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            o = json.loads(line)
            out.append(Result(o["target"], o["scenario"], o["params"], o["metrics"],
                              o["gen_cpu_pct"], o["server_cpu_pct"], o["saturated"],
                              o["errors"]))
    return out


def queue_summary_main(argv: Sequence[str]) -> int:
    """``queue_summary_main([FILE, "--markdown"?])``: print the table of a JSON-lines file."""
    results = read_json_lines(argv[0])
    print(queue_summary(results, markdown="--markdown" in argv[1:]))
    pairs = queue_pairs(results)
    ok = bool(pairs) and all(rd.ok and mq.ok for rd, mq in pairs)
    return 0 if ok else 1


# --- plot -------------------------------------------------------------------------------


def plot_available() -> bool:
    """Whether matplotlib imports: ``--plot`` is checked before any scenario runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: Sequence[Result], path: str | os.PathLike[str]) -> bool:
    """Latency distributions (rtt, e2e) and throughputs; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, scenario in zip(axes[:2], ("rtt", "e2e"), strict=True):
        for r in results:
            if r.scenario != scenario or not r.samples_us:
                continue
            s = sorted(r.samples_us)
            n = len(s)
            # x: percentile on a log scale of 1/(1-p), the usual latency-tail view
            xs = [1 / (1 - min(i / n, 0.99999)) for i in range(n)]
            ax.plot(xs, s, label=f"{r.target} ({params_text(r)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [2, 10, 100, 1000, 10000]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%"])
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (µs)")
        ax.set_title(f"{scenario} latency")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax = axes[2]
    bars = [r for r in results if r.scenario in ("publish", "fanout") and r.metrics]
    targets = sorted({r.target for r in bars})
    labels = sorted({f"{r.scenario} {params_text(r)}" for r in bars},
                    key=lambda x: (x.split()[0], len(x), x))
    width = 0.8 / max(1, len(targets))
    for t_i, target in enumerate(targets):
        values = []
        for label in labels:
            match = [r for r in bars if r.target == target
                     and f"{r.scenario} {params_text(r)}" == label]
            values.append(match[0].metrics["per_s"] if match else 0)
        ax.bar([i + t_i * width for i in range(len(labels))], values, width, label=target)
    ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("messages / s")
    ax.set_title("throughput")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if targets:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --- markdown ---------------------------------------------------------------------------


def machine_info(extra: dict[str, str] | None = None) -> dict[str, str]:
    info = {
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpus": str(os.cpu_count()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory"] = f"{int(mem) // 1024} MiB"
    except (OSError, IndexError, ValueError):
        pass
    try:
        import trio

        info["trio"] = trio.__version__
    except ImportError:  # pragma: no cover
        pass
    info.update(extra or {})
    return info


def markdown(results: Sequence[Result], *, command: str, plot_name: str | None,
             extra_info: dict[str, str] | None = None, when: str = "") -> str:
    parts = [BEGIN, ""]
    parts.append(f"Run{' of ' + when if when else ''}: `{command}`")
    parts.append("")
    parts.append(markdown_table(HEADERS, rows(results)))
    checks = check_targets(results)
    if any(c.met is not None for c in checks):
        parts += ["", "Targets of issue 5 (ratios in this same run):", ""]
        parts.append(markdown_table(("target", "wanted", "measured (mq-trio vs Redis)",
                                     "verdict"), checks_rows(checks)))
    with_auth = auth_checks(results)
    if with_auth:
        parts += ["", "The cost of authentication (issue 12: publish throughput with "
                  "--auth within 10% of without, in this same run):", ""]
        parts.append(markdown_table(("target", "wanted", "measured (with auth vs without)",
                                     "verdict"), checks_rows(with_auth)))
    if plot_name:
        parts += ["", f"![latency and throughput]({plot_name})"]
    parts += ["", "Machine:", ""]
    parts += [f"- {k}: {v}" for k, v in machine_info(extra_info).items()]
    parts += ["", END]
    return "\n".join(parts)


def splice_markdown(path: Path, block: str, title: str = "# Benchmarks") -> None:
    """Replace the generated block of ``path`` (between the markers), keeping the prose."""
    text = path.read_text() if path.exists() else f"{title}\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def command_line() -> str:
    return " ".join(["mq-trio", *sys.argv[1:]]) if sys.argv else "mq-trio bench"
