"""Authentication and per-topic permissions (docs/security.md): sans-IO rules, plus an
authenticator that runs the slow verifications off the event loop.

The server imports this package only when ``--auth FILE`` is given: the embedded
default needs neither argon2 nor PyJWT.

The public API (what the server, the CLI and the tests use):

* :class:`Authenticator` -- built from an auth file (``Authenticator.load``); turns an
  ``auth`` command's credentials (or a client certificate's subject) into a
  :class:`Grant`, or raises :class:`AuthFailed`.
* :class:`Grant` -- what one authenticated identity may do: ``may_publish(topic)`` and
  ``may_subscribe(topic)``, a dict lookup after a topic's first check.
* :class:`AuthConfigError` -- an auth file that cannot be read or is invalid (one
  line that says where and why).
* :func:`hash_password`, :func:`new_token` -- what ``mq-trio passwd`` prints.
* :class:`GlobSet` -- the topic glob rules on their own.
"""

from ._authenticator import Authenticator
from ._errors import AuthConfigError, AuthFailed
from ._globs import GlobSet
from ._grant import Grant
from ._secrets import hash_password, new_token

__all__ = [
    "AuthConfigError",
    "AuthFailed",
    "Authenticator",
    "GlobSet",
    "Grant",
    "hash_password",
    "new_token",
]
