"""``mq-trio passwd``: print a hash line for an auth file (docs/security.md)."""

from __future__ import annotations

import argparse
import getpass
import sys

DESCRIPTION = """\
Print what to paste into an --auth file (docs/security.md).

Without --token: asks for a password twice (or reads one line from stdin with --stdin)
and prints its argon2id hash as a user's 'password' key. The password itself is never
a command-line argument: those show up in ps and shell history.

With --token: makes a new random token, prints it once (give it to the client; only its
SHA-256 is kept), then the [tokens.NAME] table with its hash.
"""

EPILOG = """\
examples:
  mq-trio passwd alice >> auth.toml                    # prompts twice
  printf '%s\\n' "$PW" | mq-trio passwd --stdin alice   # from a script
  mq-trio passwd --token ingest-bot
"""


def add_passwd_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "passwd",
        help="print a password hash or a new token for --auth",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="the user's (or token's) name: prints the whole [users.NAME] or [tokens.NAME] "
        "table; without it, only the password line (a token is named 'NAME')",
    )
    p.add_argument(
        "--token",
        action="store_true",
        help="make a new random token for a machine client instead of hashing a password",
    )
    p.add_argument(
        "--stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of "
        "prompting (for scripts)",
    )
    p.set_defaults(func=run_passwd)


def _read_password(from_stdin: bool) -> str | None:
    """The password, or None after saying on stderr why there is none."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password again: ")
        except (EOFError, KeyboardInterrupt):
            print("mq-trio passwd: no password given", file=sys.stderr)
            return None
        if password != again:
            print("mq-trio passwd: the passwords do not match", file=sys.stderr)
            return None
    if not password:
        print("mq-trio passwd: an empty password is not allowed", file=sys.stderr)
        return None
    return password


def run_passwd(args: argparse.Namespace) -> int:
    from ..auth import hash_password, new_token  # argon2 only for this command
    from ..auth._toml import key_path

    if args.token:
        if args.stdin:
            print("mq-trio passwd: --token makes its own secret; --stdin is for passwords",
                  file=sys.stderr)
            return 2
        name = args.name or "NAME"
        token, stored = new_token()
        print("Give this token to the client (it is shown only this once):", file=sys.stderr)
        print(token)
        print("Add this to the auth file (with publish/subscribe lists):", file=sys.stderr)
        print(f"[tokens.{key_path(name)}]")
        print(f'hash = "{stored}"')
        return 0
    password = _read_password(args.stdin)
    if password is None:
        return 1
    line = f'password = "{hash_password(password)}"'
    if args.name:
        print(f"[users.{key_path(args.name)}]")
    print(line)
    return 0
