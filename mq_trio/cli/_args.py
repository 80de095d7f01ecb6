"""Argument types shared by the subcommands (serve, pub, sub, bench)."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import ssl
from collections.abc import Mapping

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


def positive_seconds(text: str) -> float:
    """A number of seconds > 0 (and finite): timeouts and intervals of every command."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds > 0: {text!r}")
    return value


def positive_count(text: str) -> int:
    """A whole number >= 1 (limits, rows, concurrency)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {text!r}")
    return value


def byte_size(text: str) -> int:
    """Parse ``1048576``, ``64k``, ``8MiB``, ``1G`` (binary units) into bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 65536, 64k, 8MiB)")
    unit = (m.group(2) or "")[:1].lower()
    return int(m.group(1)) * _UNITS[unit]


# --- credentials and TLS for the client commands (pub, sub, bench) ---------------------

TOKEN_VARIABLE = "MQ_TRIO_TOKEN"
PASSWORD_VARIABLE = "MQ_TRIO_PASSWORD"


class UsageError(Exception):
    """Arguments that cannot work (exit status 2); the message is one line for stderr."""


def add_security_args(p: argparse.ArgumentParser, tls_note: str = "wss:// URLs always use "
                      "TLS") -> None:
    """``--token``, ``--user``, ``--tls``, ``--cafile``: what pub, sub and bench share."""
    g = p.add_argument_group(
        "authentication and TLS", "for a server started with --auth and/or --tls-cert "
        "(docs/security.md in the source tree)"
    )
    g.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help=f"authenticate with this token (a static token or a JWT); default: the "
        f"{TOKEN_VARIABLE} environment variable, which keeps it out of the process list",
    )
    g.add_argument(
        "--user",
        default=None,
        metavar="USER",
        help=f"authenticate as USER; the password comes from the {PASSWORD_VARIABLE} "
        "environment variable, or is asked for on the terminal (never a flag)",
    )
    g.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the server's certificate with the system's "
        f"CAs ({tls_note})",
    )
    g.add_argument(
        "--cafile",
        default=None,
        metavar="PEM",
        help="verify the server's certificate with the CA certificate(s) in PEM instead "
        "of the system's (implies --tls)",
    )


def credentials(args: argparse.Namespace, environ: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """``token=`` or ``user=``/``password=`` for ``open_client``, from the arguments, the
    environment or a prompt on the terminal; empty for none. Raises :class:`UsageError`."""
    env = os.environ if environ is None else environ
    token = args.token if args.token is not None else env.get(TOKEN_VARIABLE) or None
    user = args.user
    if user is not None:
        if args.token is not None:
            raise UsageError("give either --token or --user, not both")
        return {"user": user, "password": _password(user, env)}
    if token is not None:
        return {"token": token}
    return {}


def _password(user: str, env: Mapping[str, str]) -> str:
    password = env.get(PASSWORD_VARIABLE)
    if password is not None:
        return password
    try:
        # getpass reads /dev/tty, and would fall back to echoing stdin without one.
        with open("/dev/tty", "rb"):
            pass
    except OSError:
        raise UsageError(
            f"--user {user}: no password: set {PASSWORD_VARIABLE} (there is no terminal "
            "to ask on)"
        ) from None
    try:
        return getpass.getpass(f"password for {user}: ")
    except (EOFError, KeyboardInterrupt):
        raise UsageError(f"--user {user}: no password given") from None


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context for ``--tls``/``--cafile`` (None: plain TCP, or a wss://
    URL's default). Raises :class:`UsageError` for an unreadable CA file."""
    if args.cafile is not None:
        try:
            return ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UsageError(f"--cafile {args.cafile}: {reason}") from None
    if args.tls:
        return ssl.create_default_context()
    return None
