"""``mq-trio bench --plot`` without matplotlib: refused before any scenario runs (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

import mq_trio.benchmark.cli as bench_cli
from mq_trio.benchmark import report
from mq_trio.cli import main


def test_plot_without_matplotlib_exits_2_before_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    def no_run(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("a scenario ran although --plot cannot be honoured")

    monkeypatch.setattr(bench_cli, "run_all", no_run)
    monkeypatch.setattr(bench_cli, "started_server", no_run)
    png = tmp_path / "plot.png"
    code = main(["bench", "rtt", "--duration", "0.1", "--plot", str(png), "--start-server"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--plot needs matplotlib" in err
    assert not png.exists()


def test_plot_available_follows_the_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.plot_available() is False
