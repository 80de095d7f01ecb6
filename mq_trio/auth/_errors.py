"""The two ways authentication fails: a bad auth file, and a refused client."""

from __future__ import annotations


class AuthConfigError(Exception):
    """The auth file cannot be used. ``str(exc)`` is one line: the file, where in it (table
    and key) and why, so the operator can fix it from the log alone."""


class AuthFailed(Exception):
    """A client's credentials were refused. ``str(exc)`` is the reason for the server log;
    the client only ever sees ``Authentication failed``, and no secret is ever in it."""
