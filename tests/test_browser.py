"""A real browser uses the page: Debian's headless Chromium, driven by Playwright (sync API).

Playwright is not trio, so this is a plain test; the server runs in its own thread with
its own ``trio.run``. The browser comes from ``tests/install-browser.sh`` (tox runs it);
without one the test is skipped with a warning, or fails when
``MQ_TRIO_REQUIRE_BROWSER=1``. ``MQ_TRIO_DOCS_SCREENSHOT=path`` also saves the screenshot
there (how ``docs/img/page.png`` is made).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from support import make_config

from mq_trio.broker import Broker, MemoryHistory
from mq_trio.protocol import Send
from mq_trio.server import Config, Server, serve

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def not_run(reason: str) -> None:
    message = (
        f"BROWSER TEST NOT RUN: {reason}. Install a browser with tests/install-browser.sh "
        "(Debian: apt-get install chromium) to run it."
    )
    if os.environ.get("MQ_TRIO_REQUIRE_BROWSER"):
        pytest.fail(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


def find_chromium() -> str | None:
    for name in (os.environ.get("MQ_TRIO_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


class ThreadedServer:
    """An mq-trio server in a thread, stoppable and restartable on the same ports."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.server: Server | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None

    def start(self) -> Server:
        self._thread.start()
        if not self._ready.wait(10) or self.server is None:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self.server

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self.server = await nursery.start(partial(serve, self.config, broker=self.broker))
                self._ready.set()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def stop(self) -> None:
        """Graceful shutdown (browsers see close code 1001), and wait for it."""
        if self.server is not None and self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self.server.shutdown, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive(), "server thread did not stop"


class TCPClient:
    """A blocking line client for the test thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def request(self, obj: Any) -> Any:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        return self.receive()

    def receive(self) -> Any:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def chromium() -> Iterator[Any]:
    executable = find_chromium()
    if executable is None:
        not_run("no chromium executable found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        not_run("the playwright package is not installed (pip install -e .[test])")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_page_in_a_real_browser(chromium: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    broker = Broker(MemoryHistory(100))
    docs_screenshot = os.environ.get("MQ_TRIO_DOCS_SCREENSHOT")
    # the documented ports for the docs' screenshot, free ones otherwise
    ports = {"port": 0, "ws_port": 7001 if docs_screenshot else 0}
    first = ThreadedServer(make_config(**ports), broker)
    server = first.start()
    port, ws_port = server.port, server.ws_port
    assert ws_port is not None
    restarted: ThreadedServer | None = None
    tcp: TCPClient | None = None
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 860})
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{ws_port}/")
        expect(page.get_by_test_id("status")).to_have_text("connected")

        # subscribe through the UI
        page.get_by_test_id("sub-topic").fill("news")
        page.get_by_test_id("subscribe").click()
        card = page.locator('.topic[data-topic="news"]')
        expect(card.locator(".state")).to_have_text("subscribed")

        # a TCP client publishes; the message appears on the page
        tcp = TCPClient(port)
        assert tcp.request({"command": "subscribe", "topic": "news"}) == {"success": True}
        send = {"command": "send", "topic": "news", "msg": "hello from TCP", "delivery": "all"}
        # (a subscribed sender sees its delivery before its success)
        assert tcp.request(send) == {**send, "index": 0}
        assert tcp.receive() == {"success": True}
        first_row = card.locator(".delivery").first
        expect(first_row.locator(".msg")).to_have_text("hello from TCP")
        expect(first_row.locator(".idx")).to_have_text("#0")
        expect(card.locator(".count")).to_have_text("1")

        # the page sends; the TCP subscriber gets it
        page.get_by_test_id("send-topic").fill("news")
        page.get_by_test_id("send-msg").fill("hello from the browser")
        page.get_by_test_id("send").click()
        assert tcp.receive() == {
            "command": "send", "topic": "news", "msg": "hello from the browser",
            "delivery": "all", "index": 1,
        }
        expect(card.locator(".delivery").first.locator(".msg")).to_have_text(
            "hello from the browser"
        )

        # a failure from the server is shown
        page.get_by_test_id("raw").fill("{not json")
        page.get_by_test_id("raw-send").click()
        expect(page.get_by_test_id("last-failure")).to_contain_text("Could not parse json")

        # a second topic, for the screenshot
        page.get_by_test_id("sub-topic").fill("sensors/temperature")
        page.get_by_test_id("subscribe").click()
        for i, reading in enumerate(("21.5", "21.7", "22.0")):
            assert tcp.request(
                {"command": "send", "topic": "sensors/temperature", "msg": reading,
                 "delivery": "all", "cache": i != 1}
            ) == {"success": True}
        expect(page.locator('.topic[data-topic="sensors/temperature"] .count')).to_have_text("3")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if docs_screenshot:
            page.screenshot(path=docs_screenshot)
        # unsubscribe through the UI: the card goes, the server confirms, nothing more arrives
        sensors = page.locator('.topic[data-topic="sensors/temperature"]')
        sensors.get_by_role("button", name="Unsubscribe").click()
        expect(sensors).to_have_count(0)
        expect(page.get_by_test_id("log")).to_contain_text('ok: unsubscribe "sensors/temperature"')
        tcp.close()
        tcp = None

        # the server restarts; meanwhile two messages are published (kept in the cache)
        first.stop()
        expect(page.get_by_test_id("status")).to_contain_text("reconnecting")
        for text in ("while away 1", "while away 2"):
            broker.publish(Send("news", text, "all"))
        restarted = ThreadedServer(make_config(port=port, ws_port=ws_port), broker)
        restarted.start()
        expect(page.get_by_test_id("status")).to_have_text("connected", timeout=15_000)
        # resubscribed with last_seen = 1: exactly the two missed messages, no repeats
        rows = card.locator(".delivery")
        expect(rows).to_have_count(4)
        expect(rows.locator(".idx")).to_have_text(["#3", "#2", "#1", "#0"])
        expect(rows.first.locator(".msg")).to_have_text("while away 2")
        expect(card.locator(".last-index")).to_have_text("3")
        page.screenshot(path=str(tmp_path / "page-after-restart.png"), full_page=True)
        assert page_errors == []
    finally:
        if tcp is not None:
            tcp.close()
        if restarted is not None:
            restarted.stop()
        first.stop()
