"""A built wheel carries everything (#13 point 10): every module, the page, py.typed.

mq-trio is not on a public package index; it is installed from a checkout or from a
wheel built from one (README.md). The wheel is built the way the docs say, with
``python -m pip wheel . --no-deps``, from a copy of the source tree (the build writes a
``build/`` directory and an ``*.egg-info`` next to ``pyproject.toml``).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

#: The checkout the tests run from (not where mq_trio is imported from: under tox that is
#: an installed copy in site-packages, without pyproject.toml).
SOURCE = Path(__file__).resolve().parent.parent


def copy_source(dest: Path) -> Path:
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(SOURCE / name, dest / name)
    shutil.copytree(
        SOURCE / "mq_trio",
        dest / "mq_trio",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    return dest


def setuptools_new_enough() -> bool:
    """pyproject.toml needs setuptools >= 77 (``license = "MIT"``); bdist_wheel is in it."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def build_wheel(tree: Path, out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(out)]
    if setuptools_new_enough():
        # offline: the environment's setuptools; otherwise pip fetches the build
        # requirements (pyproject.toml [build-system]) from the configured index
        command.append("--no-build-isolation")
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("mq_trio-*.whl")
    return wheel


def test_wheel_carries_every_module_the_page_and_py_typed(tmp_path: Path) -> None:
    tree = copy_source(tmp_path / "src")
    wheel = build_wheel(tree, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        page = zf.read("mq_trio/static/index.html")
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entries = zf.read(entry_points).decode()
    modules = {
        p.relative_to(tree).as_posix() for p in (tree / "mq_trio").rglob("*.py")
    }
    assert len(modules) > 40
    missing = modules - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    assert "mq_trio/py.typed" in names
    assert page == (SOURCE / "mq_trio" / "static" / "index.html").read_bytes()
    # the command and the pytest plugin are registered
    assert "mq-trio = mq_trio.cli:main" in entries
    assert "mq_trio = mq_trio.testing" in entries
