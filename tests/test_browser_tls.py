"""The browser page over https:// and wss:// in real Chromium (docs/security.md, "TLS").

As ``test_browser.py`` (Debian's Chromium driven by Playwright, the server in its own
thread), with TLS on both ports; Chromium is launched with
``--ignore-certificate-errors`` (the test CA is not in its trust store). The page loads
over https, opens its WebSocket as wss:// to its own origin, and one message goes each
way between the page and a TLS client of the TCP port.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import make_config
from test_browser import CHROMIUM_ARGS, ThreadedServer, find_chromium, not_run
from test_tls import Certs, make_certs

from mq_trio.broker import Broker, MemoryHistory


class TLSClient:
    """A blocking line client over TLS for the test thread."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
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
def chromium_tls() -> Iterator[Any]:
    executable = find_chromium()
    if executable is None:
        not_run("no chromium executable found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        not_run("the playwright package is not installed (pip install -e .[test])")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        )
        try:
            yield browser
        finally:
            browser.close()


def test_page_over_https_and_wss(chromium_tls: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    certs: Certs = make_certs(tmp_path)
    threaded = ThreadedServer(
        make_config(port=0, ws_port=0, tls_cert=certs.cert, tls_key=certs.key),
        Broker(MemoryHistory(100)),
    )
    server = threaded.start()
    client: TLSClient | None = None
    try:
        page = chromium_tls.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        websockets: list[str] = []
        page.on("websocket", lambda ws: websockets.append(ws.url))
        page.goto(f"https://127.0.0.1:{server.ws_port}/")
        expect(page.get_by_test_id("status")).to_have_text("connected")
        assert websockets == [f"wss://127.0.0.1:{server.ws_port}/"]

        page.get_by_test_id("sub-topic").fill("news")
        page.get_by_test_id("subscribe").click()
        card = page.locator('.topic[data-topic="news"]')
        expect(card.locator(".state")).to_have_text("subscribed")

        # a TLS client of the TCP port publishes; the page shows it
        client = TLSClient(server.port, certs.client_context())
        assert client.request({"command": "subscribe", "topic": "news"}) == {"success": True}
        send = {"command": "send", "topic": "news", "msg": "hello over TLS", "delivery": "all"}
        assert client.request(send) == {**send, "index": 0}
        assert client.receive() == {"success": True}
        expect(card.locator(".delivery").first.locator(".msg")).to_have_text("hello over TLS")

        # the page publishes over wss; the TLS client receives it
        page.get_by_test_id("send-topic").fill("news")
        page.get_by_test_id("send-msg").fill("hello from https")
        page.get_by_test_id("send").click()
        assert client.receive() == {
            "command": "send", "topic": "news", "msg": "hello from https",
            "delivery": "all", "index": 1,
        }
        assert page_errors == []
    finally:
        if client is not None:
            client.close()
        threaded.stop()
