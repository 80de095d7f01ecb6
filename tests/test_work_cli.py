"""``mq-trio work`` and ``mq-trio pub --job/--id/--batch`` end to end: real subprocesses
(the worker, and the children it runs: small Python programs), an in-process server,
real sockets. Children that must wait are held on a FIFO the test opens when it wants
them to go on, and say on stdout (which the worker passes through) when they started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support import start_server

from mq_trio.client import open_client
from mq_trio.server import Server
from mq_trio.testing import queue_state, restart_server, wait_for_queue

MQ = [sys.executable, "-m", "mq_trio"]

#: Records its stdin and environment in DIR/INDEX-DELIVERIES, then exits with STATUS on
#: a job's first delivery and 0 on later ones. argv: DIR STATUS.
RECORD = """
import json, os, sys
env = os.environ
name = env["MQ_TRIO_INDEX"] + "-" + env["MQ_TRIO_DELIVERIES"]
with open(os.path.join(sys.argv[1], name), "w") as f:
    json.dump({"stdin": sys.stdin.read(), "topic": env["MQ_TRIO_TOPIC"],
               "token": env.get("MQ_TRIO_TOKEN")}, f)
sys.exit(int(sys.argv[2]) if env["MQ_TRIO_DELIVERIES"] == "1" else 0)
"""

#: Says it started, waits until the test opens the FIFO (argv[1]) for writing, exits 0.
HOLD = """
import os, sys
print("started", os.environ["MQ_TRIO_INDEX"], os.getpid(), flush=True)
with open(sys.argv[1]) as f:
    f.read()
print("finished", os.environ["MQ_TRIO_INDEX"], flush=True)
"""

#: Creates DIR/started-INDEX and waits (up to 20 s: exit 3) until COUNT such files exist.
MEET = """
import os, sys, time
folder, count = sys.argv[1], int(sys.argv[2])
open(os.path.join(folder, "started-" + os.environ["MQ_TRIO_INDEX"]), "w").close()
deadline = time.monotonic() + 20
while len([n for n in os.listdir(folder) if n.startswith("started-")]) < count:
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.01)
"""


async def mq(*args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion."""
    with trio.fail_after(60):
        return await trio.run_process([*MQ, *args], capture_stdout=True, capture_stderr=True,
                                      check=False, env=env)


@attrs.define
class Worker:
    """A running ``mq-trio work``; its stdout (the children's) and stderr read by line."""

    process: trio.Process
    out: bytes = b""
    err: bytes = b""

    async def _line(self, stream: Any, name: str) -> str:
        with trio.fail_after(30):
            while b"\n" not in getattr(self, name):
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError(getattr(self, name))
                setattr(self, name, getattr(self, name) + data)
        line, rest = getattr(self, name).split(b"\n", 1)
        setattr(self, name, rest)
        return str(line.decode())

    async def stdout_line(self) -> str:
        return await self._line(self.process.stdout, "out")

    async def stderr_line(self) -> str:
        return await self._line(self.process.stderr, "err")

    async def finish(self) -> tuple[int, str, str]:
        """Wait for the exit: status, the rest of stdout and of stderr."""
        with trio.fail_after(30):
            status = await self.process.wait()
            for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err")):
                while data := await stream.receive_some(65536):  # type: ignore[union-attr]
                    setattr(self, name, getattr(self, name) + data)
        return status, self.out.decode(), self.err.decode()


async def start_worker(nursery: trio.Nursery, server: Server, *args: str) -> Worker:
    process: trio.Process = await nursery.start(partial(
        trio.run_process, [*MQ, "work", "--port", str(server.port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
    ))
    return Worker(process)


async def release(fifo: Path) -> None:
    """Let the children waiting on ``fifo`` go on (opening it waits for one)."""

    def write() -> None:
        with open(fifo, "w") as f:
            f.write("go")

    await trio.to_thread.run_sync(write)


async def queue_jobs(server: Server, topic: str, *msgs: str) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        for msg in msgs:
            await client.send_job(topic, msg)


def os_listing(folder: Path) -> list[Path]:
    """The files the children left (a synchronous look, once they have exited)."""
    return sorted(folder.iterdir())


def settled(server: Server, topic: str) -> bool:
    """Nothing waiting, delayed or in flight: every job acknowledged (a job the worker
    had not acknowledged when it left would be waiting again, or still in flight)."""
    state = queue_state(server, topic)
    return state.waiting == state.in_flight == state.delayed == 0


# --- work ----------------------------------------------------------------------------------


async def test_each_job_runs_the_command_once_and_is_acknowledged(
    server: Server, tmp_path: Path
) -> None:
    await queue_jobs(server, "resize", "img-0.png", "ünïcode\nwith a newline", "img-2.png")
    env = {**os.environ, "MQ_TRIO_TOKEN": "the worker's secret"}
    result = await mq("work", "resize", "--max-jobs", "3", "-v", "--port", str(server.port),
                      "--", sys.executable, "-c", RECORD, str(tmp_path), "0", env=env)
    assert result.returncode == 0, result.stderr
    assert settled(server, "resize")
    records = {p.name: json.loads(p.read_text()) for p in os_listing(tmp_path)}
    assert records == {
        "0-1": {"stdin": "img-0.png", "topic": "resize", "token": None},
        "1-1": {"stdin": "ünïcode\nwith a newline", "topic": "resize", "token": None},
        "2-1": {"stdin": "img-2.png", "topic": "resize", "token": None},
    }
    assert result.stderr.decode().count("acknowledged") == 3


async def test_a_failing_job_is_nacked_and_run_again(server: Server, tmp_path: Path) -> None:
    await queue_jobs(server, "t", "flaky")
    result = await mq("work", "t", "--max-jobs", "2", "--port", str(server.port),
                      "--", sys.executable, "-c", RECORD, str(tmp_path), "5")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in os_listing(tmp_path)) == ["0-1", "0-2"]
    err = result.stderr.decode()
    assert "mq-trio work: job 0 of 't': exit 5; nacked, to be delivered again" in err
    assert settled(server, "t")


async def test_concurrency_runs_children_side_by_side(server: Server, tmp_path: Path) -> None:
    # Each child waits until both have started: with one at a time they would not finish.
    await queue_jobs(server, "t", "a", "b")
    result = await mq("work", "t", "--concurrency", "2", "--max-jobs", "2",
                      "--port", str(server.port), "--", sys.executable, "-c", MEET,
                      str(tmp_path), "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # no failure to report
    assert settled(server, "t")


async def test_first_signal_lets_the_running_child_finish(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    await queue_jobs(server, "t", "first", "second")
    worker = await start_worker(nursery, server, "t", "-v", "--", sys.executable, "-c",
                                HOLD, str(fifo))
    assert (await worker.stdout_line()).startswith("started 0 ")
    worker.process.send_signal(signal.SIGTERM)
    while "stopping" not in await worker.stderr_line():
        pass
    await release(fifo)
    status, out, err = await worker.finish()
    assert status == 128 + signal.SIGTERM, err
    assert out == "finished 0\n"  # the second job was not started
    assert "job 0 of 't': exit 0, acknowledged" in err
    state = await wait_for_queue(server, "t", lambda q: q.waiting == 1 and not q.in_flight)
    assert state.consumers == 0
    async with open_client("127.0.0.1", server.port) as client:
        async with client.consume("t") as jobs:
            assert (await jobs.receive()).msg == "second"


async def test_second_signal_kills_the_children(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    await queue_jobs(server, "t", "stuck")
    worker = await start_worker(nursery, server, "t", "-v", "--", sys.executable, "-c",
                                HOLD, str(fifo))
    started = await worker.stdout_line()
    child = int(started.split()[2])
    worker.process.send_signal(signal.SIGINT)
    while "stopping" not in await worker.stderr_line():
        pass  # (two signals at once would be one: trio delivers a pending signal once)
    worker.process.send_signal(signal.SIGINT)
    status, out, err = await worker.finish()
    assert status == 128 + signal.SIGINT, err
    assert out == ""  # the child never finished
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped
    await wait_for_queue(server, "t", lambda q: q.waiting == 1)  # not acknowledged


async def test_a_child_over_its_timeout_is_terminated_and_nacked(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)  # never opened for writing: the child waits until terminated
    await queue_jobs(server, "t", "slow")
    result = await mq("work", "t", "--timeout", "0.5", "--max-jobs", "1",
                      "--nack-delay", "3600", "--port", str(server.port),
                      "--", sys.executable, "-c", HOLD, str(fifo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("started 0 ")
    assert ("no exit within 0.5 s (--timeout), terminated; nacked, to be delivered again "
            "in 3600 s") in result.stderr.decode()
    state = queue_state(server, "t")
    assert (state.delayed, state.waiting, state.in_flight) == (1, 0, 0)


async def test_a_command_that_cannot_run(server: Server, tmp_path: Path) -> None:
    await queue_jobs(server, "t", "job")
    missing = str(tmp_path / "no-such-program")
    result = await mq("work", "t", "--port", str(server.port), "--", missing)
    assert result.returncode == 127
    assert f"cannot run {missing!r}" in result.stderr.decode()
    await wait_for_queue(server, "t", lambda q: q.waiting == 1)  # nacked, for later
    (tmp_path / "not-executable").write_text("")
    result = await mq("work", "t", "--port", str(server.port), "--",
                      str(tmp_path / "not-executable"))
    assert result.returncode == 126, result.stderr


@pytest.mark.parametrize(("interval", "kept"), [("0.1", True), ("60", False)])
async def test_progress_keeps_a_long_job_from_the_ack_timeout(
    nursery: trio.Nursery, tmp_path: Path, interval: str, kept: bool
) -> None:
    server = await start_server(nursery, ack_timeout=0.6)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    await queue_jobs(server, "t", "long")
    worker = await start_worker(nursery, server, "t", "--max-jobs", "1",
                                "--progress-interval", interval, "--", sys.executable,
                                "-c", HOLD, str(fifo))
    assert (await worker.stdout_line()).startswith("started 0 ")
    await trio.sleep(1.5)  # the job's length: two and a half ack timeouts
    state = queue_state(server, "t")
    if kept:
        assert (state.delivered_total, state.redelivered_total) == (1, 0)
    else:
        # Taken back at the deadline, and (the worker having room again under its
        # prefetch) delivered to it again: the server counts each time.
        assert state.redelivered_total >= 1
    await release(fifo)
    status, out, err = await worker.finish()
    assert (status, out) == (0, "finished 0\n"), err
    assert settled(server, "t")


async def test_reconnect_resumes_consuming_after_a_server_restart(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    worker = await start_worker(nursery, server, "t", "--reconnect", "--max-jobs", "1",
                                "--", sys.executable, "-c", RECORD, str(tmp_path), "0")
    await wait_for_queue(server, "t", lambda q: q.consumers == 1, timeout=30)
    server = await restart_server(nursery, server)
    await wait_for_queue(server, "t", lambda q: q.consumers == 1, timeout=30)  # resumed
    await queue_jobs(server, "t", "after the restart")
    status, out, err = await worker.finish()
    assert status == 0, err
    assert [p.name for p in os_listing(tmp_path)] == ["0-1"]
    assert settled(server, "t")


async def test_work_without_a_server_is_status_1(tmp_path: Path) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # a port nobody listens on
    result = await mq("work", "t", "--port", str(port), "--", "true")
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"mq-trio work: cannot connect to 127.0.0.1:{port}")


async def test_work_usage_errors(tmp_path: Path) -> None:
    result = await mq("work", "t")
    assert result.returncode == 2
    assert b"no command: mq-trio work TOPIC [options] -- CMD" in result.stderr
    result = await mq("work", "t", "--concurrency", "0", "--", "true")
    assert result.returncode == 2 and b"--concurrency" in result.stderr
    result = await mq("work", "--help")
    assert result.returncode == 0 and b"-- CMD [ARGS...]" in result.stdout


async def test_options_after_the_double_dash_are_the_commands(
    server: Server, tmp_path: Path
) -> None:
    await queue_jobs(server, "t", "x")
    result = await mq("work", "t", "--port", str(server.port), "--max-jobs", "1", "--",
                      sys.executable, "-c", "import sys; print(sys.argv[1:])", "-v",
                      "--port", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"['-v', '--port', '1']\n"


# --- pub --job, --id, --batch ----------------------------------------------------------------


async def test_pub_job_prints_indexes(server: Server) -> None:
    port = str(server.port)
    result = await mq("pub", "--job", "t", "a", "b", "--port", port)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"0\n1\n", b"")
    assert queue_state(server, "t").waiting == 2
    result = await mq("pub", "t", "plain", "--port", port)  # no index, as before
    assert (result.returncode, result.stdout) == (0, b"")
    result = await mq("pub", "--batch", "--job", "t", "c", "d", "e", "--port", port)
    assert (result.returncode, result.stdout) == (0, b"3\n4\n5\n")
    assert queue_state(server, "t").waiting == 5


async def test_pub_id_publishes_once(server: Server) -> None:
    port = str(server.port)
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        first = await mq("pub", "t", "hello", "--id", "greeting-1", "--port", port)
        assert (first.returncode, first.stdout, first.stderr) == (0, b"0\n", b"")
        again = await mq("pub", "t", "hello", "--id", "greeting-1", "--port", port)
        assert (again.returncode, again.stdout) == (0, b"0\n")
        assert b"id 'greeting-1' was published before (index 0)" in again.stderr
        await client.send("t", "marker")
        assert [(await client.receive()).msg for _ in range(2)] == ["hello", "marker"]


async def test_pub_job_queue_full_is_status_1(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_queue_jobs=1)
    result = await mq("pub", "--job", "t", "a", "b", "--port", str(server.port))
    assert result.returncode == 1
    assert result.stdout == b"0\n"
    assert result.stderr == b"mq-trio pub: Queue full\n"


@pytest.mark.parametrize(("args", "message"), [
    (["t", "a", "b", "--id", "x"], b"--id names one message"),
    (["t", "-", "a"], b"cannot be mixed"),
    (["--job", "--delivery", "all", "t", "a"], b"--job is delivered to one consumer"),
    (["t", "a", "--id", ""], b"--id takes 1 to 256"),
])
async def test_pub_usage_errors(args: list[str], message: bytes) -> None:
    result = await mq("pub", *args, "--port", "9")
    assert result.returncode == 2
    assert message in result.stderr
