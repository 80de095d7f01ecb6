"""The browser page's rough edges (#13 point 11).

(a)-(c) in real Chromium (the harness of tests/test_browser.py): a URL where nothing
listens says "cannot connect to ws://…", not ``closed (1006)``; the red banner never keeps
an old failure while the server is down; a resume that could not cover the gap (the epoch
extension's ``recovered: false`` after a known epoch) is shown on the topic.

(d) The page is read once and served from memory: a reinstall under a running server
(the installed file replaced or missing) does not break it. Real sockets on 127.0.0.1;
the file is always a copy (``PAGE_PATH`` monkeypatched), never the installed one.
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from support import LineClient, make_config, start_server
from test_browser import TCPClient, ThreadedServer, chromium  # noqa: F401 - the fixture

import mq_trio.server  # noqa: F401 - loading the server loads the page
from mq_trio.broker import Broker, MemoryHistory
from mq_trio.protocol import Send
from mq_trio.server import Server
from mq_trio.transports import _http

REAL_PAGE = Path(_http.__file__).resolve().parent.parent / "static" / "index.html"


async def http_get(port: int) -> tuple[bytes, bytes]:
    with trio.fail_after(5):
        client = await LineClient.connect(port)
        await client.send_raw(b"GET / HTTP/1.0\r\n\r\n")
        response = await client.read_to_eof()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.fixture
def page_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the page, where the loader reads it from; nothing loaded yet."""
    copy = tmp_path / "index.html"
    shutil.copyfile(REAL_PAGE, copy)
    monkeypatch.setattr(_http, "PAGE_PATH", copy)
    monkeypatch.setattr(_http, "_page", None)
    return copy


def replace_file(path: Path, data: bytes | None) -> bytes:
    """What a reinstall does to the file (blocking, and instant): its old bytes."""
    old = path.read_bytes()
    path.unlink()
    if data is not None:
        path.write_bytes(data)
    return old


async def ws_server(nursery: trio.Nursery) -> Server:
    server = await start_server(nursery, ws_port=0)
    assert server.ws_port is not None
    return server


def test_the_page_is_loaded_with_the_server() -> None:
    assert _http._page == REAL_PAGE.read_bytes()


async def test_page_served_after_the_file_is_removed(
    nursery: trio.Nursery, page_copy: Path
) -> None:
    server = await ws_server(nursery)
    assert server.ws_port is not None
    status, first = await http_get(server.ws_port)
    assert status == b"HTTP/1.1 200 OK" and first == REAL_PAGE.read_bytes()
    replace_file(page_copy, None)  # a reinstall in progress
    status, again = await http_get(server.ws_port)
    assert status == b"HTTP/1.1 200 OK" and again == first


async def test_page_loaded_at_start_survives_a_replacement(
    nursery: trio.Nursery, page_copy: Path
) -> None:
    assert _http.load_page() is None  # what loading the server does
    original = replace_file(page_copy, b"<p>a newer, different install</p>")
    server = await ws_server(nursery)
    assert server.ws_port is not None
    status, body = await http_get(server.ws_port)
    assert status == b"HTTP/1.1 200 OK" and body == original


async def test_unreadable_page_is_a_500_not_a_reset(
    nursery: trio.Nursery, page_copy: Path
) -> None:
    replace_file(page_copy, None)
    assert _http.load_page() is not None
    server = await ws_server(nursery)
    assert server.ws_port is not None
    status, _ = await http_get(server.ws_port)
    assert status.startswith(b"HTTP/1.1 500 ")
    # once the file is back, the first successful read is kept
    shutil.copyfile(REAL_PAGE, page_copy)
    status, body = await http_get(server.ws_port)
    assert status == b"HTTP/1.1 200 OK" and body == REAL_PAGE.read_bytes()


# --- (a)-(c): in real Chromium -----------------------------------------------------------


def test_unreachable_url_and_a_banner_that_follows_the_connection(
    chromium: Any,  # noqa: F811 - the fixture imported above
) -> None:
    from playwright.sync_api import expect

    # a port bound but not listening: connections to it are refused, and nobody takes it
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_url = f"ws://127.0.0.1:{dead.getsockname()[1]}/"
        first = ThreadedServer(make_config(port=0, ws_port=0), Broker(MemoryHistory(100)))
        server = first.start()
        port, ws_port = server.port, server.ws_port
        restarted: ThreadedServer | None = None
        try:
            page = chromium.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            banner = page.get_by_test_id("last-failure")
            status = page.get_by_test_id("status")
            log = page.get_by_test_id("log")

            # (a) the page from a running server, pointed at a URL where nothing listens
            page.goto(f"http://127.0.0.1:{ws_port}/?url={dead_url}")
            expect(banner).to_be_visible()
            expect(banner).to_contain_text(f"Cannot connect to {dead_url}")
            expect(log).to_contain_text(f"cannot connect to {dead_url}")
            expect(status).to_contain_text("cannot connect")
            assert "1006" not in banner.inner_text() + status.inner_text() + log.inner_text()

            # the right URL: connected, the banner goes
            page.get_by_test_id("url").fill(f"ws://127.0.0.1:{ws_port}/")
            page.get_by_test_id("connect").click()  # Disconnect (it was retrying)
            expect(status).to_have_text("disconnected")
            expect(banner).to_be_hidden()
            page.get_by_test_id("connect").click()
            expect(status).to_have_text("connected")
            expect(banner).to_be_hidden()

            # (b) a failure, then the server goes away: the banner says so, not the failure
            page.get_by_test_id("raw").fill("{not json")
            page.get_by_test_id("raw-send").click()
            expect(banner).to_contain_text("Could not parse json")
            first.stop()
            expect(status).to_contain_text("cannot connect")  # down: the retries are refused
            expect(banner).not_to_contain_text("Could not parse json")
            expect(banner).to_contain_text(f"Cannot connect to ws://127.0.0.1:{ws_port}/")
            # back: the banner goes
            restarted = ThreadedServer(make_config(port=port, ws_port=ws_port),
                                       Broker(MemoryHistory(100)))
            restarted.start()
            expect(status).to_have_text("connected", timeout=15_000)
            expect(banner).to_be_hidden()
            assert page_errors == []
        finally:
            if restarted is not None:
                restarted.stop()
            first.stop()


def test_a_resume_that_cannot_cover_the_gap_is_shown(
    chromium: Any,  # noqa: F811 - the fixture imported above
) -> None:
    from playwright.sync_api import expect

    broker = Broker(MemoryHistory(100))
    first = ThreadedServer(make_config(port=0, ws_port=0), broker)
    server = first.start()
    port, ws_port = server.port, server.ws_port
    assert ws_port is not None
    servers = [first]
    tcp: TCPClient | None = None
    try:
        page = chromium.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        status = page.get_by_test_id("status")
        page.goto(f"http://127.0.0.1:{ws_port}/")
        expect(status).to_have_text("connected")
        page.get_by_test_id("sub-topic").fill("news")
        page.get_by_test_id("subscribe").click()
        card = page.locator('.topic[data-topic="news"]')
        gap = card.get_by_test_id("gap")
        expect(card.locator(".state")).to_have_text("subscribed")
        expect(gap).to_be_hidden()  # a first subscribe has nothing to recover

        tcp = TCPClient(port)
        for text in ("one", "two"):
            assert tcp.request({"command": "send", "topic": "news", "msg": text,
                                "delivery": "all"}) == {"success": True}
        tcp.close()
        tcp = None
        expect(card.locator(".last-index")).to_have_text("1")

        # a restart keeping the history (same epoch): the resume covers the gap, no notice
        first.stop()
        expect(status).not_to_have_text("connected")
        broker.publish(Send("news", "while away", "all"))
        second = ThreadedServer(make_config(port=port, ws_port=ws_port), broker)
        servers.append(second)
        second.start()
        expect(card.locator(".last-index")).to_have_text("2", timeout=15_000)
        expect(card.locator(".state")).to_have_text("subscribed")
        expect(page.get_by_test_id("log")).to_contain_text('ok: subscribe "news"')
        expect(gap).to_be_hidden()

        # an in-memory server restarted: a new history (new epoch), indexes from 0 again
        second.stop()
        expect(status).not_to_have_text("connected")
        fresh = Broker(MemoryHistory(100))
        for text in ("new 0", "new 1", "new 2", "new 3"):
            fresh.publish(Send("news", text, "all"))
        third = ThreadedServer(make_config(port=port, ws_port=ws_port), fresh)
        servers.append(third)
        third.start()
        expect(status).to_have_text("connected", timeout=15_000)
        # resumed after index 2: only "new 3" arrives; "new 0".."new 2" were skipped
        expect(card.locator(".delivery").first.locator(".msg")).to_have_text("new 3")
        expect(gap).to_be_visible()
        expect(gap).to_contain_text("messages may have been missed")
        expect(gap).to_contain_text("index 2")
        expect(page.get_by_test_id("last-failure")).to_contain_text(
            re.compile(r'Topic "news": messages may have been missed')
        )
        assert page_errors == []
    finally:
        if tcp is not None:
            tcp.close()
        for s in reversed(servers):
            s.stop()
