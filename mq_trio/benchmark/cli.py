"""``mq-trio bench``: run scenarios against a protocol-v1 server, Redis or NATS (TCP or,
for subscribers, WebSocket)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..cli._args import UsageError, add_security_args, credentials, ssl_context
from ..protocol import encode_auth, frame
from . import report
from .base import TLS_SCENARIOS
from .dialects import MQ, NATS, REDIS, REDIS_STREAM, resp_command
from .procstat import listening_pid
from .queue import queue_params, run_queue
from .scenarios import (
    BenchError,
    Progress,
    Result,
    Settings,
    Target,
    run_conns,
    run_e2e,
    run_fanout,
    run_publish,
    run_rtt,
)

SCENARIOS = ("rtt", "e2e", "publish", "fanout", "conns")
#: Run only when named: not part of the pub/sub comparison (bench/compare.sh) that
#: running every scenario makes; bench/queue_compare.sh runs it against Redis Streams.
EXTRA_SCENARIOS = ("queue",)
#: What ``--ws`` applies to: the scenarios with subscribers (publishers stay on TCP).
WS_SCENARIOS = ("fanout", "e2e")
#: What ``--sub-port`` applies to (subscribers on another server; publish and rtt have
#: none and run against --port, with the other server's CPU measured too).
SUB_SCENARIOS = ("e2e", "publish", "fanout")
#: What ``--nats`` runs: conns and queue speak without NATS's CONNECT handshake.
NATS_SCENARIOS = ("rtt", "e2e", "publish", "fanout")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None


def _named_pid(text: str) -> tuple[str, int]:
    name, sep, pid = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, int(pid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not NAME=PID: {text!r}") from None


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = Settings()
    p = commands.add_parser(
        "bench",
        help="benchmark a protocol-v1 server (or Redis) with a raw-socket load generator",
        description="Load generator for any protocol-v1 server and for Redis pub/sub. "
        "Scenarios: rtt (round-trip latency), e2e (publish-to-delivery latency at a fixed "
        "rate), publish (pipelined throughput), fanout (one publisher, S subscribers), "
        "conns (many idle subscribed connections: setup time, RSS, delivery time); and, only "
        "when named, queue (acknowledged jobs: P producers, C consumers; against Redis: "
        "Streams with a consumer group).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", default=[],
                   help=f"which to run, of {', '.join(SCENARIOS + EXTRA_SCENARIOS)} "
                   f"(default: {', '.join(SCENARIOS)})")
    p.add_argument("--host", default="127.0.0.1", help="server address")
    p.add_argument("--port", type=int, default=7000, help="server port")
    p.add_argument("--redis", action="store_true",
                   help="the server at --host/--port is Redis (PUBLISH/SUBSCRIBE over RESP)")
    p.add_argument("--redis-stream", action="store_true",
                   help="with --redis: publish appends to a capped stream per topic "
                   "(XADD topic MAXLEN 100 * m msg), the work of a durable topic; "
                   "publish only")
    p.add_argument("--nats", action="store_true",
                   help="the server at --host/--port is NATS (PUB/SUB in its text protocol, "
                   "verbose: each PUB acknowledged by +OK); rtt, e2e, publish and fanout only")
    p.add_argument("--ws", action="store_true",
                   help=f"subscribers of {' and '.join(WS_SCENARIOS)} connect over WebSocket "
                   "to --ws-port (raw sockets, nothing decoded: deliveries counted by token or by "
                   "frame headers); the "
                   "publisher stays on TCP; results are labelled 'over WebSocket' "
                   f"(default scenarios: {', '.join(WS_SCENARIOS)})")
    p.add_argument("--ws-port", type=int, default=None, metavar="PORT",
                   help="the server's WebSocket port for --ws (with --start-server: the "
                   "started server gets a free one)")
    p.add_argument("--sub-port", type=int, default=None, metavar="PORT",
                   help="subscribers of fanout and e2e connect to the server on this port "
                   "instead of --port, publishers stay on --port: a cluster's cross-node path "
                   "(publisher on node A, subscribers on node B, both 'serve --cluster' "
                   "with the same Redis); publish and rtt have no subscribers and run "
                   "against --port, with the subscribers' server's CPU measured beside; "
                   "with --ws, --ws-port is that server's "
                   f"(default scenarios: {', '.join(SUB_SCENARIOS)}; not conns or queue)")
    p.add_argument("--sub-host", default=None, metavar="HOST",
                   help="address of the --sub-port server (default: --host)")
    p.add_argument("--sub-pid", type=int, default=None, metavar="PID",
                   help="pid of the --sub-port server, for its CPU figures (reported as "
                   "'sub server' in the JSON's cpu_s; default: found via /proc)")
    p.add_argument("--cpu-pid", type=_named_pid, action="append", default=[],
                   metavar="NAME=PID",
                   help="also measure this process's CPU during each scenario (e.g. "
                   "redis=PID, the Redis of a cluster): CPU seconds under NAME in the "
                   "JSON's cpu_s (repeatable)")
    p.add_argument("--name", default=None,
                   help="label of the server in the output (default mq-trio or redis)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="pid of the server for CPU/RSS figures (default: found via /proc)")
    p.add_argument("--start-server", action="store_true",
                   help="start 'mq-trio serve' on a free port for the run, stop it after")
    p.add_argument("--server-cpu", type=int, default=None, metavar="CPU",
                   help="pin a server started with --start-server to this CPU")
    p.add_argument("--cpu", type=int, default=None, metavar="CPU",
                   help="pin the generator (and its worker processes) to this CPU")
    p.add_argument("--compare-redis", type=_address, default=None, metavar="HOST:PORT",
                   help="also run every scenario against the Redis server at HOST:PORT")
    p.add_argument("--duration", type=float, default=d.duration,
                   help="seconds per timed scenario")
    p.add_argument("--size", type=int, default=d.size, help="characters per message")
    p.add_argument("--window", type=int, default=d.window,
                   help="unacknowledged sends per publisher")
    p.add_argument("--rate", type=int, default=d.rate, help="e2e messages per second")
    p.add_argument("--publishers", type=_int_list, default=d.publishers, metavar="P[,P..]",
                   help="publish: publisher processes (one run per value)")
    p.add_argument("--subscribers", type=_int_list, default=d.subscribers, metavar="S[,S..]",
                   help="fanout: subscribers (one run per value)")
    p.add_argument("--conns", type=int, default=d.conns, help="conns: connections")
    p.add_argument("--producers", type=_positive, default=d.producers,
                   help="queue: producer processes (each keeps --window sends unanswered)")
    p.add_argument("--consumers", type=_positive, default=d.consumers,
                   help="queue: consumer processes (one connection each)")
    p.add_argument("--prefetch", type=_positive, default=d.prefetch,
                   help="queue: unacknowledged jobs per consumer (Redis: XREADGROUP COUNT)")
    p.add_argument("--backlog", type=int, default=d.backlog,
                   help="queue: jobs the producers may be ahead of the acks "
                   "(0: twice the producers' windows plus the consumers' prefetch)")
    p.add_argument("--procs", type=int, default=d.procs,
                   help="fanout: processes the subscribers are spread over")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write one JSON object per result to FILE ('-' for stdout)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write latency/throughput plots (needs the 'plot' extra: matplotlib)")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="write (or update the generated block of) a Markdown report")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--compare-auth", action="store_true",
                   help="with --start-server: also start a server with --auth (a file made "
                   "for the run, with one token allowed everything) and run every scenario "
                   f"against both ('{report.MQ_NAME}' and '{report.AUTH_NAME}'): the cost "
                   "of authentication and permission checks")
    add_security_args(p, tls_note=f"only {' and '.join(TLS_SCENARIOS)} run over TLS")
    p.set_defaults(func=run_bench)


class ProgressBar:
    """A one-line progress bar on stderr; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.label = ""

    def for_label(self, label: str) -> Progress:
        self.label = label
        self(0.0)
        return self

    def __call__(self, fraction: float) -> None:
        if not self.enabled:
            return
        fraction = max(0.0, min(1.0, fraction))
        filled = int(fraction * 30)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {self.label}"
                         "\033[K")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def redis_info(host: str, port: int) -> dict[str, str]:
    """``INFO server`` as a dict (version, process_id); empty if it cannot be read."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(resp_command("INFO", "server"))
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                header, _, body = data.partition(b"\r\n")
                if header.startswith(b"$") and len(body) >= int(header[1:]):
                    break
    except (OSError, ValueError):
        return {}
    info = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key] = value.strip()
    return info


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError("the server did not start listening")


def _wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Until something listens on ``port`` (a started server's second listener)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def started_server(host: str, cpu: int | None, *extra: str) -> Iterator[tuple[int, int]]:
    """Run ``mq-trio serve`` in a subprocess; yield (port, pid); stop it with SIGINT.

    ``extra``: more ``serve`` arguments (``--auth FILE``...)."""
    port = _free_port(host)
    cmd = [sys.executable, "-m", "mq_trio", "serve", "--host", host, "--port", str(port),
           "--log-level", "warning", *extra]
    preexec: Callable[[], None] | None = None
    if cpu is not None:
        def preexec() -> None:
            os.sched_setaffinity(0, {cpu})
    proc = subprocess.Popen(cmd, preexec_fn=preexec)
    try:
        _wait_listening(host, port, proc)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _auth_file_for_run(stack: contextlib.ExitStack) -> tuple[str, str]:
    """An auth file with one token allowed everything (removed at exit); (path, token)."""
    import tempfile

    from ..auth import new_token

    token, token_hash = new_token()
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mq-trio-bench-"))
    path = Path(directory) / "auth.toml"
    path.write_text(auth_file_text(token_hash))
    return str(path), token


def auth_file_text(token_hash: str) -> str:
    """The auth file of ``--compare-auth`` (docs/security.md): one token, every topic.

    One glob each, so that a permission check costs what it costs a typical deployment:
    a memo lookup per command once a topic was checked on the connection.
    """
    return (
        '[tokens."bench"]\n'
        f'hash = "{token_hash}"\n'
        'publish = ["**"]\n'
        'subscribe = ["**"]\n'
    )


def run_scenario(name: str, target: Target, st: Settings, progress: ProgressBar,
                 variant: int | None) -> Result:
    label = f"{name} {target.name}" + (f" ({variant})" if variant is not None else "")
    bar = progress.for_label(label)
    try:
        if target.ssl_context is not None and name not in TLS_SCENARIOS:
            raise BenchError(f"not run over TLS (only {', '.join(TLS_SCENARIOS)} are)")
        if name == "rtt":
            return run_rtt(target, st, bar)
        if name == "e2e":
            return run_e2e(target, st, bar)
        if name == "publish":
            return run_publish(target, st, variant or 1, bar)
        if name == "fanout":
            return run_fanout(target, st, variant or 1, bar)
        if name == "queue":
            return run_queue(target, st, bar)
        return run_conns(target, st, bar)
    except (BenchError, OSError) as exc:
        params: dict[str, Any] = {}
        if name == "publish":
            params = {"publishers": variant, "window": st.window, "size": st.size}
        elif name == "fanout":
            params = {"subscribers": variant, "window": st.window, "size": st.size}
        elif name == "conns":
            params = {"conns": st.conns}
        elif name == "e2e":
            params = {"rate": st.rate, "size": st.size}
        elif name == "queue":
            params = queue_params(st, target)
        else:
            params = {"size": st.size}
        return Result(target.name, name, params, errors=[f"failed: {exc}"])
    finally:
        progress.clear()


def run_all(targets: list[Target], scenarios: list[str], st: Settings,
            progress: ProgressBar, on_result: Callable[[Result], None] | None = None
            ) -> list[Result]:
    """Every scenario (and variant) against every target, interleaved per scenario."""
    results = []
    for name in scenarios:
        variants: tuple[int | None, ...] = (None,)
        if name == "publish":
            variants = st.publishers
        elif name == "fanout":
            variants = st.subscribers
        for variant in variants:
            for target in targets:
                result = run_scenario(name, target, st, progress, variant)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def run_bench(args: argparse.Namespace) -> int:
    cross = args.sub_port is not None or args.sub_host is not None
    scenarios = list(args.scenarios) or list(
        WS_SCENARIOS if args.ws else NATS_SCENARIOS if args.nats
        else SUB_SCENARIOS if cross else SCENARIOS
    )
    unknown = [s for s in scenarios if s not in SCENARIOS + EXTRA_SCENARIOS]
    if unknown:
        print(f"mq-trio bench: unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        secrets = credentials(args)
        context = ssl_context(args)
        if args.compare_auth and not args.start_server:
            raise UsageError("--compare-auth needs --start-server")
        if args.compare_auth and (secrets or context is not None or args.redis):
            raise UsageError("--compare-auth starts both servers itself: no --token, "
                             "--user, --tls, --cafile or --redis with it")
        if args.redis and args.nats:
            raise UsageError("--redis and --nats: one server at a time")
        if args.redis_stream and (not args.redis or set(args.scenarios) != {"publish"}):
            raise UsageError("--redis-stream goes with --redis and the publish scenario "
                             "alone (mq-trio bench --redis --redis-stream publish)")
        if args.nats and (secrets or context is not None or args.start_server
                          or args.compare_auth):
            raise UsageError("--nats: no --token, --user, --tls, --cafile, --start-server "
                             "or --compare-auth with it")
        if args.nats:
            other = [s for s in scenarios if s not in NATS_SCENARIOS]
            if other:
                raise UsageError(f"--nats: only {', '.join(NATS_SCENARIOS)} "
                                 f"(not {', '.join(other)})")
        if args.ws:
            if args.redis:
                raise UsageError("--ws: Redis has no WebSocket listener")
            if args.compare_auth or context is not None:
                raise UsageError("--ws runs without --compare-auth, --tls and --cafile")
            if args.ws_port is None and not args.start_server:
                raise UsageError("--ws needs --ws-port (or --start-server)")
            other = [s for s in scenarios if s not in WS_SCENARIOS]
            if other:
                raise UsageError(f"--ws: only {', '.join(WS_SCENARIOS)} have subscribers "
                                 f"(not {', '.join(other)})")
        if cross:
            if args.start_server or args.compare_auth:
                raise UsageError("--sub-port/--sub-host name a server that shares topics "
                                 "with the one at --port: not with --start-server or "
                                 "--compare-auth")
            other = [s for s in scenarios if s in ("conns", "queue")]
            if other:
                raise UsageError(f"--sub-port/--sub-host: not with {', '.join(other)} "
                                 "(its connections both publish and subscribe)")
        if args.redis and (secrets or context is not None):
            raise UsageError("--token, --user, --tls and --cafile are for mq-trio, not Redis")
        if args.plot and not report.plot_available():
            raise UsageError("--plot needs matplotlib (pip install 'mq-trio[plot]' "
                             "or pip install matplotlib)")
    except UsageError as exc:
        print(f"mq-trio bench: {exc}", file=sys.stderr)
        return 2
    auth = frame([encode_auth(**secrets)]) if secrets else b""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    st = Settings(
        duration=args.duration, size=args.size, window=args.window, rate=args.rate,
        publishers=args.publishers, subscribers=args.subscribers, conns=args.conns,
        procs=args.procs, producers=args.producers, consumers=args.consumers,
        prefetch=args.prefetch, backlog=args.backlog,
    )
    progress = ProgressBar(sys.stderr.isatty() if args.progress is None else args.progress)
    json_out = None
    if args.json == "-":
        json_out = sys.stdout
    elif args.json:
        json_out = open(args.json, "w")  # noqa: SIM115 - closed below

    def emit(result: Result) -> None:
        if json_out is not None:
            json_out.write(json.dumps(result.to_json()) + "\n")
            json_out.flush()

    extra: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if args.start_server:
            if args.redis:
                print("mq-trio bench: --start-server starts mq-trio, not Redis", file=sys.stderr)
                return 2
            ws_args: tuple[str, ...] = ()
            if args.ws:
                args.ws_port = args.ws_port or _free_port(args.host)
                ws_args = ("--ws-port", str(args.ws_port))
            port, pid = stack.enter_context(
                started_server(args.host, args.server_cpu, *ws_args)
            )
            if args.ws:
                _wait_port(args.host, args.ws_port)
        else:
            port, pid = args.port, args.server_pid
        targets = []
        if args.redis:
            info = redis_info(args.host, port)
            if pid is None and "process_id" in info:
                pid = int(info["process_id"])
            if "redis_version" in info:
                extra["redis"] = info["redis_version"]
        if pid is None:
            pid = listening_pid(port)
        name = args.name or ("redis" if args.redis else "nats" if args.nats
                             else report.MQ_NAME)
        kind = (REDIS_STREAM if args.redis_stream else REDIS if args.redis
                else NATS if args.nats else MQ)
        cpu_pids = dict(args.cpu_pid)
        if cross:
            sub_host = args.sub_host or args.host
            sub_port = args.sub_port or port
            if args.name is None:
                name += f" (subscribers on {sub_host}:{sub_port})"
            sub_pid = args.sub_pid
            if sub_pid is None and sub_port != port:
                sub_pid = listening_pid(sub_port)
            if sub_pid is not None:
                cpu_pids = {report.SUB_SERVER: sub_pid, **cpu_pids}
            else:
                print("mq-trio bench: pid of the --sub-port server unknown: no CPU "
                      "figures for it", file=sys.stderr)
        targets.append(Target(name + (" over WebSocket" if args.ws else ""), args.host,
                              port, kind, pid, auth=auth, ssl_context=context,
                              ws_port=args.ws_port if args.ws else None,
                              sub_host=args.sub_host, sub_port=args.sub_port,
                              cpu_pids=cpu_pids))
        if args.compare_auth:
            auth_file, token = _auth_file_for_run(stack)
            aport, apid = stack.enter_context(
                started_server(args.host, args.server_cpu, "--auth", auth_file)
            )
            targets.append(Target(report.AUTH_NAME, args.host, aport, MQ, apid,
                                  auth=frame([encode_auth(token=token)])))
        if args.compare_redis:
            rhost, rport = args.compare_redis
            info = redis_info(rhost, rport)
            rpid = int(info["process_id"]) if "process_id" in info else listening_pid(rport)
            if "redis_version" in info:
                extra["redis"] = info["redis_version"]
            targets.append(Target(report.REDIS_NAME, rhost, rport, REDIS, rpid))
        for t in targets:
            if t.pid is None:
                print(f"mq-trio bench: pid of {t.name} unknown: no server CPU/RSS figures",
                      file=sys.stderr)
        try:
            results = run_all(targets, scenarios, st, progress, emit)
        finally:
            if json_out is not None and json_out is not sys.stdout:
                json_out.close()
    out = sys.stderr if args.json == "-" else sys.stdout
    print(report.table(results), file=out)
    checks = report.check_targets(results)
    if len(targets) > 1 and any(c.met is not None for c in checks):
        print("\n" + report.checks_table(checks), file=out)
    with_auth = report.auth_checks(results)
    if with_auth:
        print("\n" + report.checks_table(with_auth, versus="with auth vs without"), file=out)
    plot_name = None
    if args.plot:
        if report.plot(results, args.plot):
            plot_name = args.plot
        else:
            print("mq-trio bench: --plot needs matplotlib (pip install 'mq-trio[plot]')",
                  file=sys.stderr)
    if args.markdown:
        md = Path(args.markdown)
        rel = None
        if plot_name:
            rel = os.path.relpath(Path(plot_name).resolve(), md.resolve().parent)
        block = report.markdown(results, command=report.command_line(), plot_name=rel,
                                extra_info=extra, when=time.strftime("%Y-%m-%d %H:%M %Z"))
        report.splice_markdown(md, block)
    return 0 if all(r.ok for r in results) else 1
