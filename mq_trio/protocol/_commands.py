"""The commands of protocol v1 and their validation: plain data, no I/O.

The contract is docs/protocol.md; the failure texts below are quoted from it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import attrs
import msgspec

# The exact failure texts of the contract (docs/protocol.md, "Replies").
DECODE_ERROR = "Could not decode input as UTF-8"
PARSE_ERROR = "Could not parse json"
MALFORMED = "Malformed json message"
INTERNAL_ERROR = "Internal exception"
LINE_TOO_LONG = "Line too long"
#: A durable server could not write the message (docs/protocol.md, extensions).
STORAGE_UNAVAILABLE = "Storage unavailable"
# Limits (docs/protocol.md, extensions; docs/operations.md, "Limits and abuse").
#: A line was not completed within --line-timeout of its first byte; the connection closes.
LINE_TIMEOUT = "Line timeout"
#: The server holds --max-connections clients; the new one is closed after this reply.
TOO_MANY_CONNECTIONS = "Too many connections"
#: The command would create a topic beyond --max-topics; the connection stays.
TOO_MANY_TOPICS = "Too many topics"
#: Unfinished lines of all clients together passed --max-input-bytes; this client's
#: connection (the one growing its unfinished line) closes.
INPUT_LIMIT = "Too much unfinished input"
# Authentication (docs/protocol.md, extensions; docs/security.md).
#: Auth is on and this connection has not authenticated; the connection stays.
NOT_AUTHENTICATED = "Not authenticated"
#: Wrong credentials; the connection closes after this reply.
AUTH_FAILED = "Authentication failed"
#: No successful ``auth`` within --auth-timeout of connecting; the connection closes.
AUTH_TIMEOUT = "Authentication timeout"
#: The connection's token expired before a new ``auth`` refreshed it; it closes.
TOKEN_EXPIRED = "Token expired"
#: The identity may not publish to, or subscribe to, that topic; the connection stays.
PERMISSION_DENIED = "Permission denied"
# Work queues (docs/protocol.md, "Acknowledged jobs").
#: A job or batch of jobs beyond --max-queue-jobs or --max-job-bytes; nothing accepted.
QUEUE_FULL = "Queue full"
#: ack/nack/progress of a job this connection does not hold.
UNKNOWN_JOB = "Unknown job"

DEFAULT_MAX_LINE_BYTES = 1 << 20
#: The integers a command may hold (``last_seen``): 64-bit signed. Any integer outside is
#: refused as malformed, a literal of more than 19 digits before it is converted (Python's
#: int-from-str is quadratic: a 1 MiB line of digits took 42 s). docs/protocol.md, extensions.
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1

Delivery = Literal["all", "one"]


@attrs.frozen(slots=True)
class Subscribe:
    topic: str
    last_seen: int = -1
    cache: bool = True
    #: The epoch extension (docs/protocol.md): None for a version-1 subscribe.
    epoch: str | None = None
    #: A consumer of the topic's jobs (docs/protocol.md, "Acknowledged jobs").
    ack: bool = False
    #: With ``ack``: unacknowledged jobs it may hold at once.
    prefetch: int = 1


@attrs.frozen(slots=True)
class Unsubscribe:
    topic: str


# Not frozen: one is built per message, and a frozen attrs class sets each field through
# object.__setattr__ (0.48 us for these five fields against 0.15 us for plain slots).
@attrs.define(slots=True)
class Send:
    topic: str
    msg: str
    delivery: Delivery
    cache: bool = True
    # The command as received (stripped, UTF-8): a delivery is this object plus "index",
    # so it is cheaper and more faithful to splice the index into the bytes than to
    # re-encode. Empty for a Send built in code.
    raw: bytes = attrs.field(default=b"", repr=False, eq=False)


@attrs.define(slots=True)
class SendEx(Send):
    """A ``send`` with extension keys: a job (``ack``), a message ``id``, or both. Its own
    class, so the version-1 hot path (``type(event) is Send``) never looks at them."""

    ack: bool = False
    id: str | None = None


@attrs.frozen(slots=True)
class Batch:
    """Several messages for one topic, accepted all or none (docs/protocol.md)."""

    topic: str
    msgs: tuple[str, ...]
    delivery: Delivery
    cache: bool = True
    ack: bool = False
    id: str | None = None


#: Bounds of the work-queue extensions' values (docs/protocol.md).
MAX_ID_CHARS = 256
MAX_PREFETCH = 10_000
MAX_BATCH = 10_000
MAX_NACK_DELAY = 86_400.0


class JobCommand(msgspec.Struct, tag_field="command", forbid_unknown_fields=True, gc=False):
    """``ack``, ``nack`` or ``progress`` of a job this connection holds: half the lines
    of a work queue, so a msgspec struct, which the parser's fast path decodes and
    checks in one C call, straight into the command (``Ack``, ``Nack``, ``Progress``)."""

    topic: str
    index: Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]

    @property
    def command(self) -> str:
        return str(self.__struct_config__.tag)


class Ack(JobCommand, tag="ack"):
    pass


class Progress(JobCommand, tag="progress"):
    pass


class Nack(JobCommand, tag="nack"):
    #: Seconds before the job may be delivered again; UNSET (absent) is 0.
    delay: Annotated[float, msgspec.Meta(ge=0, le=MAX_NACK_DELAY)] | msgspec.UnsetType = (
        msgspec.UNSET
    )

    @property
    def seconds(self) -> float:
        delay = self.delay
        return 0.0 if delay is msgspec.UNSET else float(delay)


#: The job commands' classes (``type(event) in JOB_COMMANDS``: one hash lookup).
JOB_COMMANDS = frozenset((Ack, Nack, Progress))


@attrs.frozen(slots=True)
class Auth:
    """``{"command": "auth", "token": ...}`` or ``{"command": "auth", "user": ...,
    "password": ...}`` (docs/protocol.md, extensions). ``repr`` never shows secrets."""

    token: str | None = attrs.field(default=None, repr=False)
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen(slots=True)
class Failure:
    reason: str


@attrs.frozen(slots=True)
class Quit:
    pass


QUIT = Quit()

Command = Subscribe | Unsubscribe | Send | Auth | Batch | JobCommand
#: What one processed line turns into. ``None`` is a blank line (no reply).
LineEvent = Subscribe | Unsubscribe | Send | Auth | Batch | JobCommand | Failure | Quit | None


# --- validation -------------------------------------------------------------------

_SEND_KEYS = frozenset(("command", "topic", "msg", "delivery", "cache"))
_SUBSCRIBE_KEYS = frozenset(("command", "topic", "last_seen", "cache", "epoch"))
_UNSUBSCRIBE_KEYS = frozenset(("command", "topic"))
_AUTH_KEYS = frozenset(("command", "token", "user", "password"))
_EXT_COMMANDS = frozenset(("batch", "ack", "nack", "progress"))
_MALFORMED = Failure(MALFORMED)
_PARSE_ERROR = Failure(PARSE_ERROR)
_DECODE_ERROR = Failure(DECODE_ERROR)


def validate(obj: object, raw: str = "") -> Command | Failure:
    """Turn a decoded JSON value into a command, or the ``Malformed json message`` failure.

    ``raw`` is the command's stripped text; a Send keeps it, encoded (see ``Send.raw``).

    ``type(x) is ...`` rather than ``isinstance`` because JSON booleans are not integers
    (and the other way round) under this contract.
    """
    if type(obj) is not dict:
        return _MALFORMED
    command = obj.get("command")
    if command == "auth":
        return _validate_auth(obj)
    if command in _EXT_COMMANDS:
        from ._ext import validate_ext  # the work-queue commands (protocol/_ext.py)

        return validate_ext(obj, command, raw)
    topic = obj.get("topic")
    if type(topic) is not str:
        return _MALFORMED
    cache = obj.get("cache", True)
    if type(cache) is not bool:
        return _MALFORMED
    if command == "send":
        msg = obj.get("msg")
        delivery = obj.get("delivery")
        if type(msg) is not str or (delivery != "all" and delivery != "one"):
            return _MALFORMED
        if not _SEND_KEYS.issuperset(obj):
            from ._ext import validate_send_ex

            return validate_send_ex(obj, raw)
        try:
            encoded = raw.encode()
        except UnicodeEncodeError:
            # Only a str handed to parse_text_stdlib can hold a lone surrogate (no strict UTF-8
            # decode makes one); without raw, encode_delivery writes escaped JSON.
            encoded = b""
        return Send(topic, msg, delivery, cache, encoded)
    if command == "subscribe":
        last_seen = obj.get("last_seen", -1)
        epoch = obj.get("epoch")
        if "ack" in obj or "prefetch" in obj:
            from ._ext import validate_consumer

            return validate_consumer(obj)
        if (
            type(last_seen) is not int
            or not INT_MIN <= last_seen <= INT_MAX
            or not _SUBSCRIBE_KEYS.issuperset(obj)
            or (type(epoch) is not str and "epoch" in obj)
        ):
            return _MALFORMED
        return Subscribe(topic, last_seen, cache, epoch)
    if command == "unsubscribe":
        if not _UNSUBSCRIBE_KEYS.issuperset(obj):
            return _MALFORMED
        return Unsubscribe(topic)
    return _MALFORMED


def _validate_auth(obj: dict[str, object]) -> Auth | Failure:
    """A token alone, or a user with a password; nothing else, all strings."""
    if not _AUTH_KEYS.issuperset(obj):
        return _MALFORMED
    token = obj.get("token")
    user = obj.get("user")
    password = obj.get("password")
    if type(token) is str and user is None and password is None:
        return Auth(token=token)
    if type(user) is str and type(password) is str and token is None:
        return Auth(user=user, password=password)
    return _MALFORMED
