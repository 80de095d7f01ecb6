"""A trio client for mq-trio (and any protocol-v1 server), over TCP or WebSocket, with
optional authentication (``token=``, ``user=``/``password=``) and TLS (``ssl_context=``),
and mq-trio's work-queue extensions: jobs (``send_job``, ``consume``), batches, idempotent
``publish`` and a spool file that keeps unacknowledged publishes across restarts."""

from ._client import PROBE_TOPIC, Client, Consumer, open_client
from ._jobs import Job, Published
from ._spool import DEFAULT_SPOOL_MAX_BYTES, SpoolError
from ._values import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    AuthError,
    Backoff,
    ConnectError,
    ConnectionEvent,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    QueueFull,
    SpoolFull,
    Target,
    UnknownJob,
    parse_target,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_SPOOL_MAX_BYTES",
    "PROBE_TOPIC",
    "AuthError",
    "Backoff",
    "Client",
    "ConnectError",
    "ConnectionEvent",
    "ConnectionLost",
    "Consumer",
    "Gap",
    "Job",
    "MQError",
    "Message",
    "Published",
    "QueueFull",
    "SpoolError",
    "SpoolFull",
    "Target",
    "UnknownJob",
    "open_client",
    "parse_target",
]
