"""Argument types shared by the subcommands (serve, pub, sub, bench)."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (the OS would silently wrap a larger number)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return port


def byte_size(text: str) -> int:
    """Parse ``1048576``, ``64k``, ``8MiB``, ``1G`` (binary units) into bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 65536, 64k, 8MiB)")
    unit = (m.group(2) or "")[:1].lower()
    return int(m.group(1)) * _UNITS[unit]
