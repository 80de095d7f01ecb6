"""The pytest plugin (mq_trio.testing), used the way a user's project would use it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mq_trio import Client, Server

USER_TESTS = '''
import pytest
import trio

import mq_trio


async def my_app(host, port, n):
    """Stands in for the user's application: it publishes orders."""
    async with mq_trio.open_client(host, port) as client:
        for i in range(n):
            await client.send("orders", f"order {i}")


async def test_my_app(mq_server, mq_client):
    await mq_client.subscribe("orders")
    await my_app("127.0.0.1", mq_server.port, 3)
    got = [(await mq_client.receive()).msg for _ in range(3)]
    assert got == ["order 0", "order 1", "order 2"]


@pytest.mark.mq_server(cache_size=2)
async def test_marker_configures_the_server(mq_server, mq_client):
    assert mq_server.config.cache_size == 2
    for i in range(5):
        await mq_client.send("t", str(i))
    await mq_client.subscribe("t")
    assert [(await mq_client.receive()).msg for _ in range(2)] == ["3", "4"]
    assert mq_client.buffered == 0


@pytest.mark.mq_server(max_line_bytes=64, max_pending_bytes=1024)
async def test_marker_limits(mq_client):
    with pytest.raises(mq_trio.MQError, match="Line too long"):
        await mq_client.send("t", "x" * 100)


async def test_factories(mq_server, mq_server_factory, mq_client_factory):
    other = await mq_server_factory(cache_size=1)
    assert other.port != mq_server.port
    a = await mq_client_factory(other)
    b = await mq_client_factory("127.0.0.1", other.port, reconnect=True)
    c = await mq_client_factory()  # to mq_server
    await a.subscribe("t")
    await b.send("t", "hello")
    assert (await a.receive()).msg == "hello"
    await c.subscribe("t")
    await c.send("t", "elsewhere")
    assert (await c.receive()).msg == "elsewhere"
    assert a.buffered == 0


async def test_restart_keeps_the_cache_for_reconnecting_clients(
    mq_server, mq_client_factory, nursery
):
    from mq_trio.testing import restart_server

    sub = await mq_client_factory(reconnect=True)
    await sub.subscribe("t")
    pub = await mq_client_factory()
    await pub.send("t", "before")
    assert (await sub.receive()).msg == "before"
    port = mq_server.port
    new = await restart_server(nursery, mq_server)
    assert new.port == port
    pub = await mq_client_factory(new)
    await pub.send("t", "after")
    with trio.fail_after(5):
        assert (await sub.receive()).msg == "after"
    assert sub.reconnects == 1 and sub.buffered == 0


PORTS = []


async def test_remember_port(mq_server):
    PORTS.append(mq_server.port)


async def test_previous_server_is_gone():
    with pytest.raises(mq_trio.ConnectError):
        async with mq_trio.open_client("127.0.0.1", PORTS[0]):
            pass


async def test_a_failing_user_test_fails_cleanly(mq_client):
    await mq_client.subscribe("t")
    assert False, "the user's own assertion"
'''


def test_plugin_in_a_user_project(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=USER_TESTS)
    # A fresh interpreter, as in the user's project: the plugin comes from the entry point.
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines(["*test_a_failing_user_test_fails_cleanly FAILED*",
                                 "*the user's own assertion*"])


def test_the_example_in_docs_testing_md(pytester: pytest.Pytester) -> None:
    """docs/testing.md's complete test, run as written."""
    doc = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", doc, re.DOTALL)
    assert [name for name, _ in blocks] == ["myapp.py", "test_myapp.py"]
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    for name, code in blocks:
        pytester.path.joinpath(name).write_text(code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_unknown_marker_setting_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.mq_server(cache_sise=3)
async def test_typo(mq_server):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()  # pytest-trio reports fixture errors as failures
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1
    result.stdout.fnmatch_lines(["*unknown mq_server settings: cache_sise*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.mq_server(**settings)*"])


# The project's own suite loads the plugin too; its fixtures sit beside conftest's.


@pytest.mark.mq_server(cache_size=7)
async def test_fixtures_in_this_suite(
    mq_server: Server, mq_client: Client, server: Server
) -> None:
    assert mq_server.config.cache_size == 7
    assert server is not mq_server and server.port != mq_server.port
    await mq_client.subscribe("t")
    await mq_client.send("t", "x")
    assert (await mq_client.receive()).msg == "x"
