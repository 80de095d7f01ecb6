"""``mq-trio pub`` and ``mq-trio sub``: publish and subscribe from a shell.

Modelled on ``mosquitto_pub``/``mosquitto_sub`` and ``nats pub``/``nats sub``: ``sub``
prints one delivery per line until interrupted (or ``--count`` messages); ``pub`` sends
one message (or several), or one per line of stdin with ``-``. Both talk to
``--host``/``--port`` or a ``--url`` (``ws://`` for the WebSocket endpoint); both flags
take several servers (the nodes of a cluster: ``--host a:7000,b:7000``, or the flag
repeated), of which the first that answers is used (``--shuffle``: in a random order),
and with ``--reconnect`` the next one after a drop.

``pub --job`` queues jobs for ``mq-trio work`` (or any consumer) and prints each job's
index; ``pub --id`` names a message so that running the same command again does not
publish it twice; ``pub --batch`` publishes all its messages as one atomic batch.

With ``--token`` (or ``MQ_TRIO_TOKEN``) or ``--user`` (password from ``MQ_TRIO_PASSWORD``
or the terminal) they authenticate first; ``--tls``/``--cafile`` connect over TLS.

Exit status: 0 on success; 1 when the server is unreachable, the connection is lost, the
credentials or the server's certificate are refused, the server refuses a command or does
not answer it in time (``pub --timeout``, and for ``sub``'s subscribe ``--connect-timeout``),
with a one-line message on stderr; 2 for bad arguments (a --user without a password);
27 when ``sub --timeout`` ended the run (as ``mosquitto_sub -W`` does);
128 + the signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM), as shells
expect from a program stopped by a signal, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TextIO

import attrs
import trio

from ..client import (
    AuthError,
    Client,
    ConnectionEvent,
    MQError,
    Published,
    open_client,
    parse_targets,
)
from ..protocol import AUTH_FAILED, MAX_BATCH, MAX_ID_CHARS, NOT_AUTHENTICATED, Delivery
from ._args import (
    UsageError,
    add_security_args,
    credentials,
    port_number,
    positive_seconds,
    ssl_context,
)

EXIT_OK = 0
EXIT_ERROR = 1
#: ``sub --timeout`` ran out (mosquitto_sub -W uses the same status).
EXIT_TIMEOUT = 27
#: ``pub --timeout``'s default: seconds to wait for the server to accept each message.
PUB_REPLY_TIMEOUT = 10.0


def add_pubsub_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``pub``, ``sub`` and ``work`` (called from
    :func:`mq_trio.cli.build_parser`)."""
    from ._work import add_work_parser  # (it imports this module's helpers)

    add_pub_parser(commands)
    add_sub_parser(commands)
    add_work_parser(commands)


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "server", "Several servers (the nodes of a cluster): a comma-separated list, or the "
        "flag repeated. The first that answers is used, in order; after a lost connection "
        "(with --reconnect) the next one, the one lost going last."
    )
    g.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="HOST[:PORT][,...]",
        help="server host, or HOST:PORT ([IPv6]:PORT); several: "
        "--host 10.0.0.1:7000,10.0.0.2:7000 (default 127.0.0.1)",
    )
    g.add_argument(
        "--port", type=port_number, default=None,
        help="server TCP port, for the hosts that give none (default 7000)",
    )
    g.add_argument(
        "--url",
        action="append",
        default=None,
        metavar="URL[,...]",
        help="server URL instead of --host/--port: ws://HOST:PORT/ or wss://HOST:PORT/ "
        "(WebSocket, wss: over TLS) or tcp://HOST:PORT; several: comma-separated or "
        "repeated",
    )
    g.add_argument(
        "--shuffle",
        action="store_true",
        help="with several servers: try them in a random order (spreads many clients, "
        "e.g. workers, over the nodes) rather than in the order given",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting (TLS handshake and authentication included) after this "
        "long (default 10)",
    )
    add_security_args(p)


def add_pub_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "pub",
        help="publish a message (or queue a job: --job)",
        description="Publish MSG to TOPIC and wait until the server accepted it; several "
        "MSGs are published one after the other, in order. With MSG '-', publish each line "
        "of stdin as one message (blank lines are skipped), in order. With --job, --id or "
        "--batch, each message's index is printed on stdout, one per line.",
    )
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument("msgs", metavar="MSG", nargs="+",
                   help="the message(s), or - (alone) to read lines from stdin")
    p.add_argument(
        "--delivery",
        choices=["all", "one"],
        default=None,
        help="all: every subscriber (default); one: a single subscriber, chosen at random",
    )
    p.add_argument(
        "--job",
        action="store_true",
        help="queue each message as a job for one consumer (mq-trio work TOPIC), kept by "
        "the server until a consumer acknowledges it (mq-trio servers only)",
    )
    p.add_argument(
        "--id",
        default=None,
        metavar="ID",
        help="name the message (1-256 characters): the server publishes an id once within "
        "its --dedupe-window, so a retry of this command is safe (one message, or one "
        "--batch; mq-trio servers only)",
    )
    p.add_argument(
        "--batch",
        action="store_true",
        help="publish all the messages as one atomic batch (1 to 10000): all of them, with "
        "consecutive indexes, or none (mq-trio servers only)",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="keep the message out of the topic's replay cache",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=PUB_REPLY_TIMEOUT,
        metavar="SECONDS",
        help="give up (status 1) when the server has not accepted a message this long "
        f"after it was sent (default {PUB_REPLY_TIMEOUT:g}; with -, per line)",
    )
    _add_connection_args(p)
    p.set_defaults(func=run_pub)


def add_sub_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Subscribe to TOPIC(s) and print one delivery per line until "
        "interrupted (Ctrl-C) or --count messages arrived. By default the message text "
        "is printed; --json prints objects (safe for messages containing newlines).",
    )
    p.add_argument("topics", metavar="TOPIC", nargs="+")
    p.add_argument(
        "--last-seen",
        type=int,
        default=None,
        metavar="N",
        help="replay only cached messages with an index above N",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="no replay of cached messages: only new ones",
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="exit (status 0) after N messages",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--json",
        action="store_true",
        help='print {"topic", "msg", "index", "delivery"} objects, one per line',
    )
    out.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print 'TOPIC MSG' instead of MSG",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="after a lost connection, reconnect (with several servers: to the next one) "
        "and resume from the last message printed (default: exit with status 1); "
        "disconnects, reconnects and messages a resume could not cover are reported on "
        "stderr",
    )
    p.add_argument(
        "--no-epoch",
        dest="epoch",
        action="store_false",
        help="with --reconnect: resume without mq-trio's epoch extension (for version-1 "
        "servers of the family, which reject it; a lost history then goes unnoticed)",
    )
    p.add_argument(
        "-W",
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help=f"exit with status {EXIT_TIMEOUT} after SECONDS (connecting included) unless "
        "--count messages arrived first, like mosquitto_sub -W (default: no limit)",
    )
    _add_connection_args(p)
    p.set_defaults(func=run_sub)




def _target(args: argparse.Namespace) -> tuple[tuple[str, ...], int | None]:
    """The server addresses (for ``open_client``) and the port of hosts that give none."""
    if args.url is not None:
        if args.host is not None or args.port is not None:
            raise ValueError("give either --url or --host/--port, not both")
        for url in (part.strip() for item in args.url for part in item.split(",")):
            if url and "://" not in url:
                raise ValueError(
                    f"--url {url}: a URL needs a scheme: tcp://{url} (TCP) or "
                    f"ws://{url}/ (WebSocket); or use --host/--port"
                )
        return tuple(args.url), None
    return tuple(args.host or ["127.0.0.1"]), args.port


def _several_servers(args: argparse.Namespace) -> bool:
    """Whether the flags name more than one server (checked later, by ``_prepare``)."""
    try:
        return len(parse_targets(*_target(args))) > 1
    except ValueError:
        return False


def _error(command: str, text: str) -> None:
    print(f"mq-trio {command}: {text}", file=sys.stderr)


@attrs.frozen
class Connection:
    """What ``open_client`` needs from the connection flags, checked (see ``_prepare``)."""

    target: tuple[tuple[str, ...], int | None]
    context: ssl.SSLContext | None
    secrets: dict[str, str]

    def open(self, args: argparse.Namespace, **options: Any) -> AbstractAsyncContextManager[
            Client]:
        """``open_client`` for these flags (and ``options``: reconnect, on_event...)."""
        return open_client(
            *self.target, shuffle=args.shuffle, connect_timeout=args.connect_timeout,
            ssl_context=self.context,
            token=self.secrets.get("token"), user=self.secrets.get("user"),
            password=self.secrets.get("password"), **options,
        )


def _prepare(command: str, args: argparse.Namespace) -> Connection | int:
    """The connection flags checked (a bad URL, CA file...) before any connection, or
    exit status 2 after a line on stderr."""
    try:
        target = _target(args)
        parsed = parse_targets(*target)  # report a bad URL here, before any connection
        context = ssl_context(args)
        if context is not None and any(
            one.url is not None and one.url.lower().startswith("ws:") for one in parsed
        ):
            raise UsageError("--tls/--cafile need a wss:// URL, not ws://")
        # Last: it may prompt for a password, which is pointless if something else is wrong.
        secrets = credentials(args)
    except (ValueError, UsageError) as exc:
        _error(command, str(exc))
        return 2
    return Connection(target, context, secrets)


def _run(command: str, args: argparse.Namespace, body: Callable[[Client], Awaitable[int]],
         *, time_limit: float | None = None, **options: Any) -> int:
    """Connect, run ``body``, map failures and signals to one line and an exit status."""
    prepared = _prepare(command, args)
    if isinstance(prepared, int):
        return prepared
    secrets = prepared.secrets

    async def main() -> int:
        status = EXIT_OK
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            limit = trio.move_on_after(math.inf if time_limit is None else time_limit)
            with limit:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        nonlocal status
                        async for signum in signals:
                            status = 128 + signum
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(watch)
                    try:
                        async with prepared.open(args, **options) as client:
                            status = await body(client)
                    except MQError as exc:  # ConnectError, ConnectionLost, a failure reply
                        _error(command, _explain(exc, args, secrets))
                        status = EXIT_ERROR
                    nursery.cancel_scope.cancel()
            if limit.cancelled_caught and status < 128:  # (a signal's status wins)
                sys.stdout.flush()
                return EXIT_TIMEOUT
            return status

    return trio.run(main)


def _explain(exc: MQError, args: argparse.Namespace, secrets: dict[str, str]) -> str:
    """The error's one line, with a hint where the cause is the credentials."""
    if isinstance(exc, AuthError) and exc.reason == AUTH_FAILED:
        if "user" in secrets:
            return f"{AUTH_FAILED}: the server refused user {args.user!r} and its password"
        return f"{AUTH_FAILED}: the server refused the token"
    if exc.reason == NOT_AUTHENTICATED and not secrets:
        return f"{NOT_AUTHENTICATED}: this server needs --token or --user"
    return exc.reason


# --- pub ----------------------------------------------------------------------------------


def _pub_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with pub's flags together (None: nothing)."""
    if "-" in args.msgs and len(args.msgs) > 1:
        return "MSG - (read stdin) cannot be mixed with other messages"
    if args.job and args.delivery == "all":
        return "--job is delivered to one consumer: --delivery all does not apply"
    if args.id is not None:
        if not 1 <= len(args.id) <= MAX_ID_CHARS:
            return f"--id takes 1 to {MAX_ID_CHARS} characters"
        if not args.batch and (len(args.msgs) > 1 or args.msgs == ["-"]):
            return "--id names one message: give one MSG, or use --batch (one id for all)"
    if args.batch and len(args.msgs) > MAX_BATCH:
        return f"--batch holds at most {MAX_BATCH} messages"
    return None


def run_pub(args: argparse.Namespace) -> int:
    problem = _pub_usage(args)
    if problem is not None:
        _error("pub", problem)
        return 2
    delivery: Delivery = "one" if args.job else (args.delivery or "all")
    # Only these replies carry the index (and only mq-trio servers accept them).
    indexed = args.job or args.id is not None or args.batch
    out: TextIO = sys.stdout

    def report(published: Published) -> None:
        for index in range(published.index, published.index + published.count):
            out.write(f"{index}\n")
        out.flush()
        if published.duplicate:
            _error("pub", f"id {args.id!r} was published before (index {published.index}): "
                   "not published again")

    async def publish(client: Client, texts: list[str]) -> bool:
        """Publish; False (and a line on stderr) if the server did not answer in time."""
        with trio.move_on_after(args.timeout):
            if args.batch:
                report(await client.send_batch(args.topic, texts, delivery=delivery,
                                               cache=args.cache, ack=args.job, id=args.id))
            elif indexed:
                report(await client.publish(args.topic, texts[0], delivery=delivery,
                                            cache=args.cache, ack=args.job, id=args.id))
            else:
                await client.send(args.topic, texts[0], delivery=delivery, cache=args.cache)
            return True
        _error("pub", f"no reply from {client.target} within {args.timeout:g} s (--timeout); "
               "the message may or may not have been published")
        return False

    async def texts() -> AsyncIterator[str | None]:
        """The messages to publish; None after a line that is not UTF-8 (reported)."""
        if args.msgs != ["-"]:
            for text in args.msgs:
                yield text
            return
        line_number = 0
        async for line in _stdin_lines():
            line_number += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                _error("pub", f"stdin line {line_number} is not UTF-8; stopped there")
                yield None
                return
            if text.strip():
                yield text

    async def body(client: Client) -> int:
        batch: list[str] = []
        async for text in texts():
            if text is None:
                return EXIT_ERROR
            if args.batch:
                batch.append(text)
            elif not await publish(client, [text]):
                return EXIT_ERROR
        if args.batch:
            if not 1 <= len(batch) <= MAX_BATCH:
                _error("pub", f"--batch holds 1 to {MAX_BATCH} messages, not {len(batch)}")
                return EXIT_ERROR
            if not await publish(client, batch):
                return EXIT_ERROR
        return EXIT_OK

    return _run("pub", args, body)


async def _stdin_lines() -> AsyncIterator[bytes]:
    """Lines of stdin without their ``\\n`` (or ``\\r\\n``), read without blocking trio."""
    if os.name == "posix":
        # An FdStream is cancellable (Ctrl-C works while waiting for input), unlike a
        # thread blocked in read(); it restores the fd's blocking mode when closed.
        stream: Any = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stream:
            buffer = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.removesuffix(b"\r")
            if buffer:
                yield buffer.removesuffix(b"\r")
    else:  # pragma: no cover - Windows
        async with trio.wrap_file(sys.stdin.buffer) as f:
            async for line in f:
                yield line.rstrip(b"\r\n")


# --- sub ----------------------------------------------------------------------------------


def _format(message: Any, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(attrs.asdict(message), ensure_ascii=False)
    if args.verbose:
        return f"{message.topic} {message.msg}"
    return str(message.msg)


def run_sub(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 0:
        _error("sub", "--count must be >= 0")
        return 2
    out: TextIO = sys.stdout
    # Which server: said only when there are several to choose from.
    several = _several_servers(args)

    async def body(client: Client) -> int:
        # A server that accepted the connection but does not answer: as for connecting.
        with trio.move_on_after(args.connect_timeout):
            for topic in args.topics:
                await client.subscribe(topic, last_seen=args.last_seen, cache=args.cache)
        if len(client.subscriptions) < len(set(args.topics)):
            _error("sub", f"no reply to subscribe from {client.target} within "
                   f"{args.connect_timeout:g} s (--connect-timeout)")
            return EXIT_ERROR
        printed = 0
        if args.count == 0:
            return EXIT_OK
        try:
            async for message in client.messages():
                out.write(_format(message, args) + "\n")
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
                if not client.buffered:  # flush per burst, not per line
                    out.flush()
            out.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head -3`): not an error, and nothing to flush.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return EXIT_OK

    def report(event: ConnectionEvent) -> None:
        out.flush()  # what was printed before the event comes first in a shared terminal
        where = f" to {event.target}" if several and event.target is not None else ""
        if event.kind == "lost":
            _error("sub", f"connection{where} lost ({event.reason}); reconnecting")
        elif event.kind == "reconnected":
            tries = "" if event.attempts == 1 else f" after {event.attempts} attempts"
            _error("sub", f"reconnected{where}{tries}; resuming")
        elif event.gap is not None:
            gap = event.gap
            if gap.reason == "evicted":
                why = "were evicted from the server's cache before the resume"
            else:
                why = "may be lost: the server's history was lost (a restart without " \
                    "--data-dir?); resumed from the start of its new history"
            _error("sub", f"gap in {gap.topic!r}: messages after index {gap.last_seen} {why}")

    if not args.reconnect:
        return _run("sub", args, body, time_limit=args.timeout)
    return _run("sub", args, body, time_limit=args.timeout, reconnect=True,
                epoch=args.epoch, on_event=report)
