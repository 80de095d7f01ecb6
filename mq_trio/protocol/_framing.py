"""Framing: a byte stream cut into lines, with the line limit."""

from __future__ import annotations

import attrs

from ._commands import DEFAULT_MAX_LINE_BYTES


@attrs.define(weakref_slot=False)
class LineBuffer:
    """Splits a byte stream into lines at ``\\n`` and enforces the line limit.

    ``feed`` returns the complete lines of everything received so far; a partial line
    waits for more data. ``too_long`` turns true once the pending partial line (or a
    complete one) exceeds ``max_line_bytes``: the caller replies ``Line too long`` and
    closes. A ``\r`` before the ``\n`` is part of the terminator and not counted (the
    line is returned with it; the parser strips it as whitespace).
    """

    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    # A bytearray, and only new data is searched for "\n": a long line arriving in many
    # small segments costs O(its length), not O(length squared) in copies and scans.
    # None while there is no partial line: no object per idle connection.
    _partial: bytearray | None = None
    too_long: bool = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        limit = self.max_line_bytes
        partial = self._partial
        if b"\n" not in data:
            if partial is None:
                partial = self._partial = bytearray(data)
            else:
                partial += data
            # A "\r" one past the limit may still be the start of the "\r\n" ending.
            if len(partial) > limit and _over(partial, limit):
                self.too_long = True
                self._partial = None
            return []
        if partial is not None:
            partial += data
            data = bytes(partial)
            self._partial = None
        elif type(data) is not bytes:
            data = bytes(data)  # trio streams may hand out a bytearray
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            if len(tail) > limit and _over(tail, limit):
                self.too_long = True
            else:
                self._partial = bytearray(tail)
        if len(data) > limit + 1:  # only then can a complete line be over the limit
            for i, line in enumerate(lines):
                if len(line) > limit and _over(line, limit):
                    self.too_long = True
                    self._partial = None
                    return lines[:i]
        return lines

    @property
    def pending_bytes(self) -> int:
        """The size of the incomplete line (0: none)."""
        partial = self._partial
        return 0 if partial is None else len(partial)

    @property
    def pending(self) -> bytes:
        """The incomplete line kept until its newline (or EOF) arrives."""
        return b"" if self._partial is None else bytes(self._partial)


def _over(line: bytes | bytearray, limit: int) -> bool:
    """Whether a line (or its start) longer than ``limit`` is over it: a ``\r`` right
    after the limit belongs to the ``\r\n`` terminator, it is not counted."""
    return len(line) > limit + 1 or line[-1] != 0x0D
