"""The ``mq-trio`` command line."""

from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from functools import partial

import attrs
import trio

from .. import __version__
from ..server import (
    Config,
    Server,
    open_http_listeners,
    open_listeners,
    open_ws_listeners,
    serve,
)
from ..transports import parse_origins
from ._args import byte_size, port_number
from ._config import (
    CONFIG_VARIABLE,
    SettingError,
    Settings,
    format_size,
    list_type,
    resolve,
    settings_of,
    track_flags,
)

log = logging.getLogger("mq_trio")

#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = (100_000, 20, 10)


def tune_gc() -> None:
    """Collect cyclic garbage less often: a server holds many long-lived objects per
    connection, and with the default thresholds the collector was a large share of the
    time to set up 10,000 connections (``mq-trio bench conns``: 5.5 s -> 1.6 s). Cycles
    are still collected; the objects alive at startup are left out of every pass."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def raise_open_file_limit() -> None:
    """Allow as many connections as the hard limit permits (the soft limit is often 1024)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def configure_logging(level: str, fmt: str = "text") -> None:
    """Logs to stderr, as text or as one JSON object per line (cli/_service.py)."""
    from ._service import configure_logging as configure

    configure(level, fmt)


SERVE_EPILOG = (
    "Every setting above can also come from a TOML config file (--config FILE, or "
    f"${CONFIG_VARIABLE}), keyed by the flag's name without '--' (port = 7000, "
    "max-pending-bytes = \"8MiB\", accept-data-loss = true, ws-allowed-origins = [...]), "
    "and from an environment variable: MQ_TRIO_ and the name in capitals with '_' for '-' "
    "(MQ_TRIO_PORT=7000, MQ_TRIO_MAX_PENDING_BYTES=8MiB). A flag wins over the "
    "environment, which wins over the file; unknown keys and unknown MQ_TRIO_ variables "
    "are errors. --print-config shows the outcome (docs/operations.md "
    "in the source tree)."
)


class ServeHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` only where the help does not already say its default;
    sizes as ``8MiB``, unset values as ``off``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text.lower()
            or not action.option_strings
            or action.default is argparse.SUPPRESS
            or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
        ):
            return text
        default = action.default
        if default is None:
            shown = "off"
        elif action.type is byte_size and isinstance(default, int):
            shown = format_size(default)
        else:
            shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})"


def add_serve_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = Config()
    p = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the mq-trio server (protocol v1 over TCP).",
        epilog=SERVE_EPILOG,
        formatter_class=ServeHelpFormatter,
    )
    track_flags(p)  # before the flags: the config layers need to know which were given
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"read settings from this TOML file, one key per flag (port = 7000, "
        f"max-pending-bytes = \"8MiB\"); default: ${CONFIG_VARIABLE} if set, else none",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings, each with where it came from (default, the "
        "config file, an environment variable, a flag), as a config file; then exit",
    )
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=port_number, default=d.port,
                   help="TCP port (0 picks a free one)")
    p.add_argument(
        "--cache-size",
        type=int,
        default=d.cache_size,
        help="messages kept per topic for replay to new subscribers (oldest evicted)",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=byte_size,
        default=d.max_pending_bytes,
        metavar="SIZE",
        help="output a client may have queued; a subscriber past it is disconnected "
        "as a slow consumer (accepts k/M/G suffixes)",
    )
    p.add_argument(
        "--max-line-bytes",
        type=byte_size,
        default=d.max_line_bytes,
        metavar="SIZE",
        help="longest accepted command line; a longer one gets 'Line too long' and "
        "the connection is closed",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM (and per closing client), time allowed to flush output",
    )
    p.add_argument(
        "--ws-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="also serve WebSocket clients and the browser page (http://HOST:PORT/) on "
        "this port (default: off; 0 picks a free one)",
    )
    p.add_argument(
        "--ws-host",
        default=None,
        metavar="HOST",
        help="address for the WebSocket port (default: --host)",
    )
    p.add_argument(
        "--ws-allowed-origins",
        type=_origins,
        default=None,
        metavar="ORIGINS",
        help="comma-separated browser origins (scheme://host[:port]) allowed to open a "
        "WebSocket besides the page's own, or '*' for any (default: the page's own "
        "origin and http(s)://localhost, 127.0.0.1, [::1] on any port)",
    )
    p.add_argument(
        "--ws-ping-interval",
        type=float,
        default=d.ws_ping_interval,
        metavar="SECONDS",
        help="keepalive ping interval for WebSocket clients; a ping unanswered for as "
        "long drops the client (0: no pings)",
    )
    p.add_argument(
        "--cluster",
        default=None,
        metavar="URL",
        help="cluster mode: share topics with every node started with the same Redis, "
        "redis://[[user]:password@]host[:port][/db] or rediss:// for TLS (needs the "
        "'cluster' extra: pip install 'mq-trio[cluster]'); see docs/cluster.md in the "
        "source tree",
    )
    p.add_argument(
        "--cluster-lease",
        type=float,
        default=d.cluster_lease,
        metavar="SECONDS",
        help="with --cluster: how long a node's subscriber counts outlive it in Redis (a "
        "node killed without a goodbye is picked for 'one' messages at most this long; "
        "renewed three times per lease)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="keep topic indexes and caches in DIR so they survive restarts and crashes "
        "(default: off, everything in memory); see docs/durability.md in the source tree",
    )
    p.add_argument(
        "--fsync",
        default=d.fsync,
        choices=["always", "everysec", "never"],
        help="with --data-dir: fsync before acknowledging each send (always, group "
        "commit), about once a second (everysec), or leave it to the OS (never)",
    )
    p.add_argument(
        "--memory-window",
        type=int,
        default=d.memory_window,
        metavar="N",
        help="with --data-dir: cached messages per topic kept in RAM; older ones (up to "
        "--cache-size) are streamed from disk to subscribers that ask for them",
    )
    limits = p.add_argument_group(
        "limits", "bounds a hostile or careless client cannot pass (docs/operations.md in the "
        "source tree, 'Limits and abuse')"
    )
    limits.add_argument(
        "--line-timeout",
        type=float,
        default=d.line_timeout,
        metavar="SECONDS",
        help="a line still unfinished this long after its first byte gets 'Line timeout' "
        "and the connection is closed; idle clients are never affected (0: off)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help="clients served at once (TCP and WebSocket); one more gets "
        "'Too many connections' and is closed",
    )
    limits.add_argument(
        "--max-input-bytes",
        type=byte_size,
        default=d.max_input_bytes,
        metavar="SIZE",
        help="unfinished input held across all connections; the client that would pass "
        "it gets 'Too much unfinished input' and is closed",
    )
    limits.add_argument(
        "--max-topics",
        type=int,
        default=d.max_topics,
        metavar="N",
        help="topics the server keeps; a command that would create one more gets "
        "'Too many topics'",
    )
    limits.add_argument(
        "--max-cache-bytes",
        type=byte_size,
        default=d.max_cache_bytes,
        metavar="SIZE",
        help="bytes of cached messages across all topics; beyond it the oldest are "
        "evicted",
    )
    p.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="with --data-dir: start although committed data is missing or corrupt, in "
        "a new epoch (resuming clients learn of the gap); without it such a start fails",
    )
    security = p.add_argument_group(
        "security", "authentication, per-topic permissions and TLS (docs/security.md in the source "
        "tree)"
    )
    security.add_argument(
        "--auth",
        dest="auth_file",
        default=d.auth_file,
        metavar="FILE",
        help="auth file (TOML: users, tokens, JWT, per-topic permissions); clients must "
        "send an 'auth' command first. Reloaded on SIGHUP (a broken file keeps the old "
        "rules). Default: off, every client may do everything",
    )
    security.add_argument(
        "--auth-timeout",
        type=float,
        default=d.auth_timeout,
        metavar="SECONDS",
        help="with --auth: a client not authenticated this long after connecting gets "
        "'Authentication timeout' and is closed",
    )
    security.add_argument(
        "--tls-cert", default=d.tls_cert, metavar="PEM",
        help="serve TLS on the TCP and WebSocket ports (wss://, https://) with this "
        "certificate chain; needs --tls-key",
    )
    security.add_argument("--tls-key", default=d.tls_key, metavar="PEM",
                          help="the private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca", default=d.tls_client_ca, metavar="PEM",
        help="mutual TLS: clients must present a certificate signed by this CA; with "
        "--auth, a certificate subject listed in the auth file authenticates the client",
    )
    security.add_argument(
        "--tls-handshake-timeout",
        type=float,
        default=d.tls_handshake_timeout,
        metavar="SECONDS",
        help="with TLS: a client that has not completed the handshake this long after "
        "connecting is closed",
    )
    http = p.add_argument_group(
        "metrics and introspection", "an HTTP port with GET /metrics (Prometheus), /healthz, "
        "/stats, /connections and /topics (docs/operations.md in the source tree)"
    )
    http.add_argument(
        "--http-port",
        type=port_number,
        default=d.http_port,
        metavar="PORT",
        help="serve the HTTP endpoints on this port (default: off; 0 picks a free one)",
    )
    http.add_argument(
        "--http-host",
        default=d.http_host,
        metavar="HOST",
        help="address for the HTTP port; beyond loopback, anyone who reaches it sees every "
        "topic's name and every client's address",
    )
    queues = p.add_argument_group(
        "work queues", "acknowledged jobs (docs/protocol.md in the source tree, 'Acknowledged "
        "jobs')"
    )
    queues.add_argument(
        "--ack-timeout",
        type=float,
        default=d.ack_timeout,
        metavar="SECONDS",
        help="a job not acknowledged this long after its delivery (and not extended with "
        "'progress') is redelivered",
    )
    queues.add_argument(
        "--max-deliveries",
        type=int,
        default=d.max_deliveries,
        metavar="N",
        help="a job delivered this many times without an ack moves to the dead-letter "
        "topic",
    )
    queues.add_argument(
        "--dedupe-window",
        type=float,
        default=d.dedupe_window,
        metavar="SECONDS",
        help="a send repeating a message id seen this recently gets the original index "
        "and is neither stored nor delivered again (0: off)",
    )
    queues.add_argument(
        "--max-queue-jobs",
        type=int,
        default=d.max_queue_jobs,
        metavar="N",
        help="jobs waiting or in flight per topic; one more gets 'Queue full'",
    )
    queues.add_argument(
        "--max-job-bytes",
        type=byte_size,
        default=d.max_job_bytes,
        metavar="SIZE",
        help="bytes of jobs waiting or in flight across all topics; beyond it sends get "
        "'Queue full'",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity (logs go to stderr)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text, or as JSON objects (time, level, logger, message, and "
        "the client's peer on connection lines) for log collectors",
    )
    p.set_defaults(func=run_serve, _serve_settings=settings_of(p))


def config_from_args(args: argparse.Namespace) -> Config:
    """Every ``serve`` flag is named after the Config field it sets."""
    return Config(**{f.name: getattr(args, f.name) for f in attrs.fields(Config)})


@list_type  # a config file may give the origins as an array
def _origins(text: str) -> tuple[str, ...]:
    try:
        return parse_origins(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None
                   ) -> tuple[argparse.Namespace, Settings]:
    """``args`` with every setting from its layer (flag > environment > config file >
    default), and the layers' outcome (what came from where). Raises
    :class:`SettingError` for an unusable file, variable or value."""
    settings = getattr(args, "_serve_settings", None)
    if settings is None:  # a namespace not made by the serve parser
        serve_parser = _command_parser(build_parser(), ["serve"])
        assert serve_parser is not None
        settings = settings_of(serve_parser)
    layered = resolve(settings, args, os.environ if environ is None else environ,
                      getattr(args, "config", None))
    return layered.apply(args), layered


def run_serve(args: argparse.Namespace) -> int:
    try:
        args, layered = serve_settings(args)
    except SettingError as exc:
        print(f"mq-trio: {exc}", file=sys.stderr)
        return 2
    config = config_from_args(args)
    if getattr(args, "print_config", False):
        sys.stdout.write(layered.render())
        try:
            config.check()
        except ValueError as exc:
            print(f"mq-trio: invalid settings: {exc}", file=sys.stderr)
            return 2
        return 0
    configure_logging(args.log_level, args.log_format)
    if layered.config_file is not None:
        log.info("settings from %s", layered.config_file)
    try:
        config.check()
    except ValueError as exc:
        print(f"mq-trio: invalid settings: {exc}", file=sys.stderr)
        return 2
    if (
        config.ws_port is not None
        and config.ws_port != 0
        and config.ws_port == config.port
        and config.ws_host in (None, config.host)
    ):
        print(
            f"mq-trio: --ws-port {config.ws_port} is also --port: the TCP and WebSocket "
            "listeners need different ports (or --ws-port 0 for a free one)",
            file=sys.stderr,
        )
        return 2
    if config.auth_file is not None:
        from ..auth import AuthConfigError, Authenticator  # only --auth needs them

        try:
            Authenticator.load(config.auth_file)  # refuse to start on a broken file
        except AuthConfigError as exc:
            print(f"mq-trio: {exc}", file=sys.stderr)
            return 2
    if config.tls_cert is not None and config.tls_key is not None:
        from ..transports._tls import TLSConfigError, server_ssl_context

        try:  # refuse to start on an unreadable or bad certificate, key or CA file
            server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        except TLSConfigError as exc:
            print(f"mq-trio: {exc}", file=sys.stderr)
            return 2
    if config.cluster is not None:
        problem = _cluster_problem(config.cluster)
        if problem is not None:
            print(f"mq-trio: {problem}", file=sys.stderr)
            return 2
    raise_open_file_limit()
    tune_gc()
    try:
        trio.run(serve_until_signalled, config)
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        if config.ws_port is not None:
            where += f" (or WebSocket port {config.ws_port})"
        if config.http_port is not None:
            where += f" (or HTTP port {config.http_port})"
        print(f"mq-trio: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        unreachable = _find_cluster_error(exc)
        if unreachable is not None:
            print(f"mq-trio: {unreachable}", file=sys.stderr)
            return 1
        from ..store import find_store_error  # only durable mode needs sqlite3

        store_error = find_store_error(exc)
        if store_error is None:
            raise
        print(f"mq-trio: {store_error}", file=sys.stderr)
        return 1
    return 0


def _cluster_problem(url: str) -> str | None:
    """Why ``--cluster URL`` cannot work here (no hiredis, a bad URL), if it cannot."""
    try:
        from ..cluster import parse_redis_url
    except ImportError as exc:
        return (f"--cluster needs the 'cluster' extra ({exc.name} is missing): "
                "pip install 'mq-trio[cluster]'")
    try:
        parse_redis_url(url)
    except ValueError as exc:
        return f"--cluster: {exc}"
    return None


def _find_cluster_error(exc: BaseException) -> BaseException | None:
    """The node's "cannot reach Redis at start" error inside ``exc`` (maybe a group)."""
    if type(exc).__name__ == "ClusterUnavailable":
        return exc
    for inner in getattr(exc, "exceptions", ()):  # nurseries' exception groups
        found = _find_cluster_error(inner)
        if found is not None:
            return found
    return None


async def serve_until_signalled(config: Config) -> None:
    """Serve; the first SIGINT/SIGTERM shuts down gracefully, a second one at once;
    SIGHUP reloads the auth file. Tells systemd (NOTIFY_SOCKET) when it is ready,
    reloading and stopping."""
    from ._service import monotonic_usec, notify

    listeners = await open_listeners(config)  # port errors surface here, unwrapped
    ws_listeners = await open_ws_listeners(config)
    http_listeners = await open_http_listeners(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve, config, listeners=listeners, ws_listeners=ws_listeners,
                        http_listeners=http_listeners)
            )

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading")
                        notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
                        server.reload_auth()
                        notify("READY=1")
                    elif server.stopping:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                    else:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        notify("STOPPING=1")
                        server.shutdown()

            nursery.start_soon(watch_signals)
            # systemd Type=notify: ready once every listener is up (not before the
            # data directory and the auth file were loaded: serve() did that).
            host, port = server.address
            notify(f"READY=1\nSTATUS=listening on {host}:{port}\nMAINPID={os.getpid()}")
            await server.stopped.wait()
            nursery.cancel_scope.cancel()
    log.info("stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mq-trio",
        description="mq-trio: a small, fast pub/sub message server built on trio. "
        "Run 'mq-trio serve' to start it; 'mq-trio COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"mq-trio {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_serve_parser(commands)
    from ..benchmark import add_bench_parser  # imported here: the server does not need it

    add_bench_parser(commands)
    from ._pubsub import add_pubsub_parsers  # pub, sub: the client side

    add_pubsub_parsers(commands)
    from ._passwd import add_passwd_parser  # passwd: hash lines for auth files

    add_passwd_parser(commands)
    from ._stats import add_stats_parsers  # stats, top: read a server's --http-port

    add_stats_parsers(commands)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]
                    ) -> argparse.ArgumentParser | None:
    """The subcommand's parser named in ``argv`` (None: no subcommand)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    sub: argparse.ArgumentParser = action.choices[word]
                    return sub
    return None


def suggest(parser: argparse.ArgumentParser, unknown: str) -> str:
    """``unknown option --prot; did you mean --port?`` (argparse suggests only on 3.14+)."""
    name = unknown.split("=", 1)[0]
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown option {name}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(words)
    if extras:
        # The subcommand's usage (not the top level's), with a suggestion for a typo.
        where = _command_parser(parser, words) or parser
        options = [word for word in extras if word.startswith("-")]
        if options:  # (the words after an unknown option are most likely its value)
            where.error("; ".join(suggest(where, word) for word in options))
        where.error(f"unrecognized arguments: {' '.join(extras)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
