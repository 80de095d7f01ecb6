"""``mq-trio work TOPIC -- CMD [ARGS...]``: a worker that runs a command per job.

Consumes TOPIC's jobs (docs/protocol.md, "Acknowledged jobs") and runs CMD once per job,
the message on its stdin and ``MQ_TRIO_TOPIC``, ``MQ_TRIO_INDEX``, ``MQ_TRIO_DELIVERIES``
in its environment (and ``MQ_TRIO_FROM_TOPIC``/``MQ_TRIO_FROM_INDEX`` for a dead letter);
exit status 0 acknowledges the job, anything else nacks it (``--nack-delay``) so the
server delivers it again, until its ``--max-deliveries`` send it to ``$dead.TOPIC``.
``--concurrency`` children run at once; while one runs, ``progress`` keeps its job from
the server's ``--ack-timeout``. The children's stdout and stderr are the worker's.

The children run in their own session, so a Ctrl-C in the terminal reaches the worker
only: the first SIGINT or SIGTERM stops taking jobs and waits for the running children
(and settles their jobs); a second one kills them (SIGKILL) and exits at once, their
jobs unsettled (the server delivers them again). The worker's credentials
(``MQ_TRIO_TOKEN``, ``MQ_TRIO_PASSWORD``) are not passed on to the children.

The server: ``--host``/``--port`` or ``--url``, as for ``pub`` and ``sub``, several of
them for the nodes of a cluster (``--host a:7000,b:7000``; ``--shuffle`` spreads many
workers over them).

Exit status: 0 after ``--max-jobs`` jobs; 1 when the server is unreachable, refuses the
consumer subscription or the connection is lost (without ``--reconnect``; running
children are then terminated); 2 for bad arguments; 126 or 127 when CMD cannot be run
(not executable, not found; the job is nacked first); 128 + the signal number after a
stop by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ..client import Client, ConnectionLost, Job, MQError, UnknownJob
from ..protocol import MAX_NACK_DELAY, MAX_PREFETCH
from ._args import PASSWORD_VARIABLE, TOKEN_VARIABLE, positive_count, positive_seconds
from ._pubsub import EXIT_ERROR, EXIT_OK, _add_connection_args, _error, _explain, _prepare

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

#: Defaults: the client cannot know the server's --ack-timeout (30 s): a third of it.
PROGRESS_INTERVAL = 10.0
#: After SIGTERM to a child (its --timeout ran out), SIGKILL if it is still there.
KILL_GRACE = 5.0
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class _WorkParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is the command, options included."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        command: list[str] | None = None
        if "--" in words:
            cut = words.index("--")
            words, command = words[:cut], words[cut + 1:]
        parsed, extras = super().parse_known_args(words, namespace)
        if command is not None:
            parsed.command = [*parsed.command, *command]
        return parsed, extras


def add_work_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``work`` (called from :func:`mq_trio.cli.build_parser`)."""
    p = commands.add_parser(
        "work",
        help="run a command for each job of a topic",
        description="Consume TOPIC's jobs (queued with 'mq-trio pub --job' or "
        "client.send_job) and run CMD once per job: the message on its stdin, "
        "MQ_TRIO_TOPIC, MQ_TRIO_INDEX and MQ_TRIO_DELIVERIES in its environment. Exit "
        "status 0 acknowledges the job; anything else (or --timeout) nacks it, and the "
        "server delivers it again. First SIGINT/SIGTERM: take no more jobs, let the "
        "running ones finish; second: kill them and exit. Exit status: 0 after "
        "--max-jobs; 1 connection or server failure; 2 bad arguments; 126/127 CMD not "
        "executable/not found; 128+N after signal N.",
        usage="%(prog)s TOPIC [options] -- CMD [ARGS...]",
    )
    p.__class__ = _WorkParser
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument("command", metavar="CMD", nargs="*",
                   help="the command and its arguments, after -- (so that its options are "
                   "not taken for the worker's)")
    p.add_argument(
        "--concurrency",
        type=positive_count,
        default=1,
        metavar="N",
        help="run up to N children at once (default 1)",
    )
    p.add_argument(
        "--prefetch",
        type=positive_count,
        default=None,
        metavar="N",
        help=f"jobs held from the server at once, running or waiting (1-{MAX_PREFETCH}; "
        "default: --concurrency; never more than --max-jobs). Jobs waiting here when the "
        "worker stops go back to the queue, counted as a delivery",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help=f"a child running longer is terminated (SIGTERM, SIGKILL {KILL_GRACE:g} s "
        "later) and its job nacked (default: no limit)",
    )
    p.add_argument(
        "--nack-delay",
        type=_delay,
        default=0.0,
        metavar="SECONDS",
        help="a failed job is delivered again after SECONDS (default 0: at once)",
    )
    p.add_argument(
        "--progress-interval",
        type=positive_seconds,
        default=PROGRESS_INTERVAL,
        metavar="SECONDS",
        help="tell the server every SECONDS that a running job is still being worked on, "
        "restarting its --ack-timeout; keep it well under the server's --ack-timeout "
        f"(default {PROGRESS_INTERVAL:g}: a third of the default 30)",
    )
    p.add_argument(
        "--max-jobs",
        type=positive_count,
        default=None,
        metavar="N",
        help="exit (status 0) once N jobs have been run (default: run until stopped)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="after a lost connection, reconnect (with several servers: to the next one) and "
        "consume again (default: exit with status 1); the jobs of running children are "
        "then no longer this worker's: the server delivers them again, and their result is "
        "reported but not acknowledged",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="one stderr line per job (failures are always reported)",
    )
    _add_connection_args(p)
    p.set_defaults(func=run_work)






def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_NACK_DELAY:
        raise argparse.ArgumentTypeError(f"not a delay of 0 to {MAX_NACK_DELAY:g} seconds: "
                                         f"{text!r}")
    return value


def child_environment(job: Job, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment, less its credentials, plus what the job is."""
    env = dict(os.environ if environ is None else environ)
    env.pop(TOKEN_VARIABLE, None)
    env.pop(PASSWORD_VARIABLE, None)
    env["MQ_TRIO_TOPIC"] = job.topic
    env["MQ_TRIO_INDEX"] = str(job.index)
    env["MQ_TRIO_DELIVERIES"] = str(job.deliveries)
    if job.from_topic is not None:
        env["MQ_TRIO_FROM_TOPIC"] = job.from_topic
    if job.from_index is not None:
        env["MQ_TRIO_FROM_INDEX"] = str(job.from_index)
    return env


@attrs.define
class _Worker:
    """One run of ``mq-trio work``: its settings and what happened so far."""

    args: argparse.Namespace
    status: int = EXIT_OK
    #: First signal: take no more jobs.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    #: Second signal: kill the children now.
    killing: trio.Event = attrs.field(factory=trio.Event)
    taken: int = 0
    take_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def say(self, text: str) -> None:
        _error("work", text)

    def stop(self, status: int) -> None:
        """Take no more jobs; the running ones finish. The first reason's status wins."""
        if self.status == EXIT_OK:
            self.status = status
        self.stopping.set()
        self.take_scope.cancel()

    async def run(self, client: Client) -> int:
        args = self.args
        prefetch = args.prefetch or args.concurrency
        if args.max_jobs is not None:
            prefetch = min(prefetch, args.max_jobs)
        consumer = client.consume(args.topic, prefetch)
        with trio.move_on_after(args.connect_timeout):
            await consumer.start()
        if not consumer.started:
            self.say(f"no reply to the consumer subscribe from {client.target} within "
                     f"{args.connect_timeout:g} s (--connect-timeout)")
            return EXIT_ERROR
        if args.verbose:
            self.say(f"consuming {args.topic!r} (prefetch {prefetch}, concurrency "
                     f"{args.concurrency})")
        send_jobs, receive_jobs = trio.open_memory_channel[Job](0)
        async with trio.open_nursery() as nursery:

            async def dispatch() -> None:
                async with send_jobs:
                    with self.take_scope:
                        while args.max_jobs is None or self.taken < args.max_jobs:
                            job = await consumer.receive()
                            await send_jobs.send(job)
                            self.taken += 1

            nursery.start_soon(dispatch)
            async with receive_jobs:
                for _ in range(args.concurrency):
                    nursery.start_soon(self.work, client, receive_jobs.clone())
        return self.status

    async def work(self, client: Client, jobs: trio.MemoryReceiveChannel[Job]) -> None:
        async with jobs:
            async for job in jobs:
                await self.handle(client, job)

    async def handle(self, client: Client, job: Job) -> None:
        args = self.args
        name = f"job {job.index} of {job.topic!r}"
        if job.deliveries > 1:
            name += f" (delivery {job.deliveries})"
        code: int | None = None
        async with trio.open_nursery() as helpers:
            helpers.start_soon(self.keep_alive, job, name)
            try:
                code = await self.run_child(job)
                why = f"no exit within {args.timeout:g} s (--timeout), terminated" \
                    if code is None else f"killed by signal {-code}" if code < 0 \
                    else f"exit {code}"
            except OSError as exc:
                status = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else \
                    EXIT_CANNOT_EXECUTE
                self.say(f"cannot run {args.command[0]!r}: {exc.strerror or exc}; stopping")
                self.stop(status)
                why = "not run"
            finally:
                helpers.cancel_scope.cancel()
        try:
            if code == 0:
                await job.ack()
                if args.verbose:
                    self.say(f"{name}: exit 0, acknowledged")
                return
            await job.nack(args.nack_delay)
            again = f"again in {args.nack_delay:g} s" if args.nack_delay else "again"
            self.say(f"{name}: {why}; nacked, to be delivered {again}")
        except UnknownJob as exc:
            result = "exit 0" if code == 0 else "failed"
            self.say(f"{name}: {result}, but the job is no longer this worker's ({exc.reason})")

    async def keep_alive(self, job: Job, name: str) -> None:
        """``progress`` every --progress-interval while the child runs."""
        while True:
            await trio.sleep(self.args.progress_interval)
            try:
                await job.in_progress()
            except UnknownJob as exc:
                self.say(f"{name}: still running, but no longer this worker's job "
                         f"({exc.reason})")
                return
            except ConnectionLost:
                return

    async def run_child(self, job: Job) -> int | None:
        """The child's exit status (negative: killed by that signal); None if --timeout
        or the second signal ended it."""
        args = self.args
        killing = self.killing

        async def deliver_cancel(process: trio.Process) -> None:
            if not killing.is_set():
                process.terminate()
                with trio.move_on_after(KILL_GRACE):
                    await killing.wait()
            process.kill()

        options: dict[str, Any] = {}
        if os.name == "posix":
            # Out of the terminal's process group: Ctrl-C is the worker's to handle.
            options["start_new_session"] = True
        with trio.move_on_after(math.inf if args.timeout is None else args.timeout):
            done: subprocess.CompletedProcess[bytes] = await trio.run_process(
                args.command,
                stdin=job.msg.encode("utf-8"),
                check=False,
                env=child_environment(job),
                deliver_cancel=deliver_cancel,
                **options,
            )
            return done.returncode
        return None

    def kill(self, status: int) -> None:
        """The second signal: the children are killed (``deliver_cancel``) when the
        caller cancels everything; their jobs stay unsettled."""
        self.status = status
        self.killing.set()
        self.take_scope.cancel()


def run_work(args: argparse.Namespace) -> int:
    if not args.command:
        _error("work", "no command: mq-trio work TOPIC [options] -- CMD [ARGS...]")
        return 2
    if args.prefetch is not None and args.prefetch > MAX_PREFETCH:
        _error("work", f"--prefetch is at most {MAX_PREFETCH}")
        return 2
    prepared = _prepare("work", args)
    if isinstance(prepared, int):
        return prepared
    worker = _Worker(args)

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        if not worker.stopping.is_set() and consuming:
                            if args.verbose:
                                worker.say("stopping: no more jobs; waiting for the running "
                                           "ones (a second signal kills them)")
                            worker.stop(128 + signum)
                        else:
                            worker.kill(128 + signum)
                            nursery.cancel_scope.cancel()
                            return

                consuming = False
                nursery.start_soon(watch)
                try:
                    async with prepared.open(args, reconnect=args.reconnect) as client:
                        consuming = True
                        status = await worker.run(client)
                except MQError as exc:
                    _error("work", _explain(exc, args, prepared.secrets))
                    status = EXIT_ERROR
                except BaseExceptionGroup as group:  # from the worker's nursery
                    failures, rest = group.split(MQError)
                    if rest is not None or failures is None:
                        raise
                    _error("work", _explain(_first(failures), args, prepared.secrets))
                    status = EXIT_ERROR
                nursery.cancel_scope.cancel()
        if worker.killing.is_set():  # (a cancelled run assigned no status)
            return worker.status
        return status

    return trio.run(main)


def _first(group: BaseExceptionGroup[MQError]) -> MQError:
    exc = group.exceptions[0]
    return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
