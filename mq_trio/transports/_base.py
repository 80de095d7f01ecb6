"""What a connection needs from its byte carrier (TCP, WebSocket, an in-memory stream)."""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """What a connection needs from its byte carrier.

    Transport errors (a reset, a closed WebSocket) surface as ``None`` from
    ``receive_lines`` and as ``trio.BrokenResourceError`` from ``send_batch``.
    """

    @property
    def peer(self) -> str:
        """The client's address, for logs."""

    def closing_reply(self) -> bytes | None:
        """The reply to send before closing because of the wire rules (``Line too long``
        after the lines before it), or None."""

    async def receive_lines(self) -> list[bytes] | None:
        """The next complete lines (maybe none yet), or ``None`` at end of input."""

    async def send_batch(self, items: list[bytes]) -> None:
        """Send encoded JSON objects (no terminators), in order, after anything a
        ``send_nowait`` left over (``items`` may be empty to send only that)."""

    def send_nowait(self, items: list[bytes]) -> bool:
        """Send what can go without waiting; False if the rest waits for ``send_batch``."""

    def stop_receiving(self) -> None:
        """Make a waiting or later ``receive_lines`` return None soon (graceful close)."""

    async def aclose(self) -> None: ...


class WriteTurns(Protocol):
    """The server's budget of fan-out writes per scheduler pass (server/_pacer.py), as a
    transport sees it: a write that had to wait for the socket takes a turn first."""

    def take(self, size: int) -> bool:
        """A turn to write ``size`` bytes now, or False: ``wait_turn``."""

    async def wait_turn(self, size: int) -> None: ...
