"""Running under a service manager: readiness for systemd (``NOTIFY_SOCKET``) and log
lines as JSON objects (``--log-format json``) for log collectors."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger("mq_trio.server")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the
    client's ``peer`` on connection lines (records logged with ``extra={"peer": ...}``)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        peer = getattr(record, "peer", None)
        if peer is not None:
            fields["peer"] = peer
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()  # stderr
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def notify(state: str) -> bool:
    """Tell the service manager ``state`` (sd_notify: ``READY=1``, ``STOPPING=1``, ...)
    when it asked (``NOTIFY_SOCKET``); False when not asked or it could not be told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket (Linux)
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants with ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
