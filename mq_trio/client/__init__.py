"""A trio client for mq-trio (and any protocol-v1 server), over TCP or WebSocket (to one
server, or to the first that answers of several: ``open_client(["a:7000", "b:7000"])``), with
optional authentication (``token=``, ``user=``/``password=``) and TLS (``ssl_context=``),
and mq-trio's work-queue extensions: jobs (``send_job``, ``consume``), batches, idempotent
``publish`` and a spool file that keeps unacknowledged publishes across restarts."""

from ._client import PROBE_TOPIC, Client, Consumer, open_client
from ._jobs import Job, Published
from ._spool import DEFAULT_SPOOL_MAX_BYTES, SpoolError
from ._values import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Addresses,
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
    parse_targets,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_SPOOL_MAX_BYTES",
    "PROBE_TOPIC",
    "Addresses",
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
    "parse_targets",
]
