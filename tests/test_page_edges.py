"""The browser page's rough edges (#13 point 11).

(d) The page is read once and served from memory: a reinstall under a running server
(the installed file replaced or missing) does not break it. Real sockets on 127.0.0.1;
the file is always a copy (``PAGE_PATH`` monkeypatched), never the installed one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
from support import LineClient, start_server

import mq_trio.server  # noqa: F401 - loading the server loads the page
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
