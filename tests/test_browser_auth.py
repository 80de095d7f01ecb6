"""The browser page with a token, in real (headless, Debian) Chromium driven by Playwright:
the token field, ``auth`` before any subscribe, the refusals shown, and the page over
https:// talking wss:// to a server with TLS.

Not skipped when Chromium is missing: it fails, saying how to install it
(tests/install-browser.sh), so that CI cannot pass without running it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import make_config
from test_browser import CHROMIUM_ARGS, ThreadedServer, find_chromium

from mq_trio.broker import Broker, MemoryHistory
from mq_trio.testing import AuthFile, Certificates


def spki_hash(cert_file: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the first certificate in ``cert_file``:
    what ``--ignore-certificate-errors-spki-list`` trusts (this certificate, nothing else)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = cert_file.read_bytes()
    start = pem.index(b"-----BEGIN CERTIFICATE-----")
    cert = x509.load_pem_x509_certificate(pem[start:])
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    directory = tmp_path / "tls"
    directory.mkdir()
    return Certificates(lambda: directory)


@pytest.fixture
def auth(tmp_path: Path) -> AuthFile:
    directory = tmp_path / "auth"
    directory.mkdir()
    auth = AuthFile(lambda: directory)
    auth.write()
    return auth


@pytest.fixture
def browser(certificates: Certificates) -> Iterator[Any]:
    executable = find_chromium()
    if executable is None:
        pytest.fail("no chromium executable: install one with tests/install-browser.sh "
                    "(Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Chromium trusts exactly the test server's certificate (by its public key).
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(certificates.cert_file)}"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=[*CHROMIUM_ARGS, trust])
        try:
            yield chromium
        finally:
            chromium.close()


class Client:
    """A blocking line client (TLS optional) that authenticates with a token."""

    def __init__(self, port: int, token: str, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.file = sock.makefile("rb")
        assert self.request({"command": "auth", "token": token}) == {"success": True}

    def request(self, obj: Any) -> Any:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        return json.loads(self.file.readline())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def started(config_overrides: dict[str, Any]) -> ThreadedServer:
    server = ThreadedServer(make_config(ws_port=0, **config_overrides), Broker(MemoryHistory(100)))
    server.start()
    return server


def test_token_field_over_ws(browser: Any, auth: AuthFile) -> None:
    from playwright.sync_api import expect

    threaded = started({"auth_file": str(auth.path), "auth_timeout": 120.0})
    assert threaded.server is not None and threaded.server.ws_port is not None
    tcp: Client | None = None
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sent: list[str] = []
        sockets: list[str] = []

        def opened(ws: Any) -> None:
            sockets.append(ws.url)
            ws.on("framesent", lambda payload: sent.append(str(payload)))

        page.on("websocket", opened)
        page.goto(f"http://127.0.0.1:{threaded.server.ws_port}/")
        status = page.get_by_test_id("status")
        failure = page.get_by_test_id("last-failure")
        expect(status).to_have_text("connected")

        # No token: the server refuses commands, and the page says what is missing.
        page.get_by_test_id("sub-topic").fill("news")
        page.get_by_test_id("subscribe").click()
        card = page.locator('.topic[data-topic="news"]')
        expect(card.locator(".state")).to_have_text("failed: Not authenticated")
        expect(failure).to_contain_text("Not authenticated")
        expect(failure).to_contain_text("this server needs a token")

        # A wrong token: refused, shown, and not retried.
        token_field = page.get_by_test_id("token")
        token_field.fill("mqt_wrong")
        token_field.press("Enter")
        expect(status).to_have_text("authentication failed")
        expect(failure).to_contain_text("Authentication failed")
        # (the close handler logs this and sets the status: "reconnecting in ..." if it
        # were to try again)
        expect(page.get_by_test_id("log")).to_contain_text("closed (")
        expect(status).to_have_text("authentication failed")
        assert len(sockets) == 2  # the first one, and the wrong token's

        # The right token: auth first, then the resubscribe, then deliveries.
        sent.clear()
        token_field.fill(auth.token)
        token_field.press("Enter")
        expect(status).to_have_text("connected")
        expect(card.locator(".state")).to_have_text("subscribed")
        assert json.loads(sent[0]) == {"command": "auth", "token": auth.token}
        assert json.loads(sent[1])["command"] == "subscribe"
        tcp = Client(threaded.server.port, auth.token)
        send = {"command": "send", "topic": "news", "msg": "hello, authenticated",
                "delivery": "all"}
        assert tcp.request(send) == {"success": True}
        expect(card.locator(".delivery").first.locator(".msg")).to_have_text(
            "hello, authenticated")
        # The token appears nowhere on the page (the log shows commands, not secrets).
        assert auth.token not in page.get_by_test_id("log").inner_text()
        assert auth.token not in failure.inner_text()
        assert errors == []
    finally:
        if tcp is not None:
            tcp.close()
        threaded.stop()


def test_auth_timeout_stops_the_reconnecting(browser: Any, auth: AuthFile) -> None:
    from playwright.sync_api import expect

    threaded = started({"auth_file": str(auth.path), "auth_timeout": 0.3})
    assert threaded.server is not None
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{threaded.server.ws_port}/")
        expect(page.get_by_test_id("status")).to_have_text("authentication timeout")
        expect(page.get_by_test_id("last-failure")).to_contain_text(
            "Authentication timeout — this server needs a token")
        expect(page.get_by_test_id("status")).to_have_text("authentication timeout")
    finally:
        threaded.stop()


def test_page_over_https_uses_wss(browser: Any, auth: AuthFile,
                                  certificates: Certificates) -> None:
    from playwright.sync_api import expect

    threaded = started({"auth_file": str(auth.path), "auth_timeout": 120.0,
                        **certificates.server_settings()})
    assert threaded.server is not None and threaded.server.ws_port is not None
    tcp: Client | None = None
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        urls: list[str] = []
        page.on("websocket", lambda ws: urls.append(ws.url))
        port = threaded.server.ws_port
        page.goto(f"https://127.0.0.1:{port}/")
        expect(page.get_by_test_id("url")).to_have_value(f"wss://127.0.0.1:{port}/")
        expect(page.get_by_test_id("status")).to_have_text("connected")
        token_field = page.get_by_test_id("token")
        token_field.fill(auth.token)
        token_field.press("Enter")
        expect(page.get_by_test_id("status")).to_have_text("connected")
        page.get_by_test_id("sub-topic").fill("secure")
        page.get_by_test_id("subscribe").click()
        card = page.locator('.topic[data-topic="secure"]')
        expect(card.locator(".state")).to_have_text("subscribed")
        tcp = Client(threaded.server.port, auth.token, certificates.client_context())
        assert tcp.request({"command": "send", "topic": "secure", "msg": "over TLS",
                            "delivery": "all"}) == {"success": True}
        expect(card.locator(".delivery").first.locator(".msg")).to_have_text("over TLS")
        assert urls and all(u.startswith("wss://") for u in urls)
        assert errors == []
    finally:
        if tcp is not None:
            tcp.close()
        threaded.stop()
