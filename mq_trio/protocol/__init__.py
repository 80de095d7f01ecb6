"""Protocol v1 and its extensions, sans-IO: bytes in, commands out; replies in, bytes out.

Nothing here knows about sockets or trio (the h11/wsproto approach): the transports,
the client library and the benchmark's load generator all use this package to parse,
encode and frame. The contract is docs/protocol.md.
"""

from ._commands import (
    DECODE_ERROR,
    DEFAULT_MAX_LINE_BYTES,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    MALFORMED,
    PARSE_ERROR,
    QUIT,
    STORAGE_UNAVAILABLE,
    Command,
    Delivery,
    Failure,
    LineEvent,
    Quit,
    Send,
    Subscribe,
    Unsubscribe,
    validate,
)
from ._core import TERMINATOR, LineConnection, MessageConnection
from ._encode import (
    SUCCESS,
    encode_delivery,
    encode_failure,
    encode_send,
    encode_subscribe,
    encode_unsubscribe,
    failure_bytes,
    frame,
    splice_index,
)
from ._framing import LineBuffer
from ._parse import is_valid_json, parse_line, parse_line_stdlib, parse_text_stdlib

__all__ = [
    "DECODE_ERROR",
    "DEFAULT_MAX_LINE_BYTES",
    "INTERNAL_ERROR",
    "LINE_TOO_LONG",
    "MALFORMED",
    "PARSE_ERROR",
    "QUIT",
    "STORAGE_UNAVAILABLE",
    "SUCCESS",
    "TERMINATOR",
    "Command",
    "Delivery",
    "Failure",
    "LineBuffer",
    "LineConnection",
    "LineEvent",
    "MessageConnection",
    "Quit",
    "Send",
    "Subscribe",
    "Unsubscribe",
    "encode_delivery",
    "encode_failure",
    "encode_send",
    "encode_subscribe",
    "encode_unsubscribe",
    "failure_bytes",
    "frame",
    "is_valid_json",
    "parse_line",
    "parse_line_stdlib",
    "parse_text_stdlib",
    "splice_index",
    "validate",
]
