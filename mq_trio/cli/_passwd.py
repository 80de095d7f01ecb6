"""``mq-trio passwd``: print a hash line for an auth file (docs/security.md)."""

from __future__ import annotations

import argparse


def add_passwd_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser("passwd", help="print a password hash or a new token for --auth")
    p.set_defaults(func=run_passwd)


def run_passwd(args: argparse.Namespace) -> int:
    raise NotImplementedError  # filled in with mq_trio.auth
