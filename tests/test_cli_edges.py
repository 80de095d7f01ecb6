"""``mq-trio serve`` rough edges (#13, points 7 and 8): help text, option typos, ports."""

from __future__ import annotations

import re

import pytest

from mq_trio.cli import main


def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_serve_help_has_no_duplicate_or_none_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(serve_help(capsys).split())  # undo the wrapping
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    # No option's help says its default twice.
    for entry in re.split(r" (?=--[a-z])", text):
        assert entry.lower().count("default") <= 1, entry


def test_serve_help_shows_sizes_as_the_readme_does(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(serve_help(capsys).split())
    for size in ("8MiB", "1MiB", "256MiB", "1GiB"):
        assert f"(default: {size})" in text
    assert "8388608" not in text
    assert "1073741824" not in text


def test_serve_help_points_at_the_source_tree_for_docs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = " ".join(serve_help(capsys).split())
    for name in re.findall(r"docs/\w+\.md", text):
        assert f"{name} in the source tree" in text, name
