"""``mq-trio pub``/``sub`` rough edges (#13, points 6, 7 and 12), as subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from mq_trio.client import parse_target

COMMAND = [sys.executable, "-m", "mq_trio"]


async def mq(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*COMMAND, *args], stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False,
        )


# --- point 7: names and URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "command, target",
    [
        (["pub", "t", "x"], ["--host", "nosuch.invalid"]),
        (["sub", "t"], ["--host", "nosuch.invalid", "--port", "7000"]),
        (["pub", "t", "x"], ["--url", "ws://nosuch.invalid:7001/"]),
    ],
)
async def test_unresolvable_host_is_one_clear_line(command: list[str], target: list[str]
                                                   ) -> None:
    result = await mq(*command, *target)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith(f"mq-trio {command[0]}: cannot resolve host 'nosuch.invalid'")
    assert err.count("\n") == 1
    assert "Unknown error" not in err


@pytest.mark.parametrize("command", [["pub", "t", "x"], ["sub", "t"]])
async def test_url_without_a_scheme_is_refused_with_a_hint(command: list[str]) -> None:
    result = await mq(*command, "--url", "127.0.0.1:7000")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith(f"mq-trio {command[0]}: --url 127.0.0.1:7000: a URL needs a scheme")
    assert "tcp://127.0.0.1:7000" in err and "ws://127.0.0.1:7000/" in err
    assert err.count("\n") == 1


def test_client_refuses_host_colon_port_as_a_host() -> None:
    with pytest.raises(ValueError, match="tcp://127.0.0.1:7000"):
        parse_target("127.0.0.1:7000")
    assert parse_target("::1", 7000).host == "::1"  # IPv6 addresses still work
    assert parse_target("localhost", 7001).port == 7001
