"""bench/abuse.py runs a tiny scenario against a real server and reports every figure.

Nothing here asserts on speed or memory: the figures are for issue #11, measured by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench" / "abuse.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_abuse", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_nested_scenario_reports_stall_rss_and_outcome() -> None:
    abuse = load()
    args = abuse.parse_args(["nested", "--small", "--depth", "1000", "--settle", "0.2",
                             "--baseline", "0.2", "--python", sys.executable,
                             "--src", str(BENCH.parent.parent)])
    result = abuse.run_one("nested", args)
    assert result["scenario"] == "nested"
    assert result["alive"] is True
    assert "\"success\": false" in result["reply"]  # a nested msg is never accepted
    assert result["fresh_client_after"].startswith("ok")
    for key in ("stall", "stall_whole_attack", "baseline"):
        stall = result[key]
        assert set(stall) >= {"max_gap_ms", "p99_ms", "round_trips", "unfinished_at_end"}
        assert stall["round_trips"] >= 1
        assert stall["max_gap_ms"] >= 0
    rss = result["rss_mib"]
    assert 0 < rss["before"] <= rss["peak"]
    assert rss["after"] > 0
    assert result["probe_error_count"] == 0
    table = abuse.table([result])
    assert table.count("\n") == 2 and "| nested |" in table and table.count("|") == 3 * 11
