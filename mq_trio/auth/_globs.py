"""Topic globs (docs/security.md, "Topic globs"), compiled to one regex per set.

``.`` and ``/`` separate; ``*`` is any run of non-separators, ``**`` any run at all;
``{user}`` is the identity's name; every other character is literal.

The regex is built so that no topic can make it backtrack more than linearly (a client
chooses the topic, and the check runs on the event loop). ``**`` splits a pattern into
pieces; a piece between two ``**`` may commit to its earliest-ending occurrence, because
the ``**`` after it can absorb anything. Inside a segment, a chunk between two ``*`` may
commit to its leftmost occurrence for the same reason. Commitment is the atomic group
``(?=(X))\\N`` (the lookahead cannot be re-entered), which also works on Python 3.10.
The one remaining search, a piece's start after ``**``, only tries segment starts, each
touching the piece's own segments once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

SEPARATORS = "./"
USER = "{user}"

_SEG = "[^./]"
_STAR = object()
_DSTAR = object()


def tokenize(pattern: str, user: str | None = None) -> list[object]:
    """Split a glob into literal characters, ``*`` and ``**``; ValueError when it is bad."""
    if not isinstance(pattern, str):
        raise ValueError(f"a glob must be a string, not {type(pattern).__name__}")
    if not pattern:
        raise ValueError("an empty glob matches nothing useful")
    tokens: list[object] = []
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            if j - i > 2:
                raise ValueError(f"{pattern!r}: '*' runs of three or more are ambiguous")
            tokens.append(_STAR if j - i == 1 else _DSTAR)
            i = j
        elif ch == "{" and pattern.startswith(USER, i):
            if user is None:
                raise ValueError(f"{pattern!r}: {USER} needs an identity")
            if not user or any(s in user for s in SEPARATORS):
                raise ValueError(
                    f"{pattern!r}: {USER} cannot stand for {user!r} (empty or has a separator)"
                )
            tokens.extend(user)
            i += len(USER)
        elif ch in "{}":
            raise ValueError(f"{pattern!r}: braces are reserved ({USER} is the only placeholder)")
        else:
            tokens.append(ch)
            i += 1
    return tokens


class _Groups:
    """Numbers the capture groups that emulate atomic groups across one regex."""

    def __init__(self) -> None:
        self.count = 0

    def open(self) -> int:
        """Number the next group (before building its body: groups count by position)."""
        self.count += 1
        return self.count

    @staticmethod
    def atomic(number: int, body: str) -> str:
        return f"(?=({body}))\\{number}"


def _split(tokens: list[object], mark: object) -> list[list[object]]:
    parts: list[list[object]] = [[]]
    for t in tokens:
        if t is mark:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _literal(tokens: list[object]) -> str:
    return re.escape("".join(str(t) for t in tokens))


def _word(tokens: list[object], free_start: bool, end: str, groups: _Groups) -> str:
    """One segment's worth of pattern (no separator, no ``**``). ``end`` is what follows:
    a separator's regex, ``\\Z``, or "" when a ``**`` follows (the end is free)."""
    chunks = _split(tokens, _STAR)
    if free_start:
        chunks.insert(0, [])
    out = [_literal(chunks[0])]
    last = len(chunks) - 1
    for i in range(1, last + 1):
        lit = _literal(chunks[i])
        if i < last or not end:
            out.append(groups.atomic(groups.open(), f"{_SEG}*?{lit}"))
        else:
            out.append(f"{_SEG}*{lit}")
    return "".join(out) + end


def _piece(tokens: list[object], free_start: bool, free_end: bool, groups: _Groups) -> str:
    """A run of pattern without ``**``: words joined by literal separators."""
    words: list[list[object]] = [[]]
    seps: list[str] = []
    for t in tokens:
        if isinstance(t, str) and t in SEPARATORS:
            seps.append(t)
            words.append([])
        else:
            words[-1].append(t)
    out = []
    for i, word in enumerate(words):
        if i < len(seps):
            end = re.escape(seps[i])
        else:
            end = "" if free_end else r"\Z"
        out.append(_word(word, free_start and i == 0, end, groups))
    return "".join(out)


def glob_regex(tokens: list[object], groups: _Groups) -> str:
    """The regex (for ``fullmatch``) of one tokenized glob."""
    pieces = _split(tokens, _DSTAR)
    if len(pieces) == 1:
        return _piece(pieces[0], False, False, groups)
    # After a '**', a piece starts in the current segment or after a later separator;
    # either way a leading '*' in its first word takes up the rest of the choice.
    skip = "(?:|.*?[./])"
    out = [_piece(pieces[0], False, True, groups)]
    for middle in pieces[1:-1]:
        number = groups.open()
        out.append(groups.atomic(number, skip + _piece(middle, True, True, groups)))
    out.append(skip + _piece(pieces[-1], True, False, groups))
    return "".join(out)


class GlobSet:
    """Compiled topic globs: ``matches(topic)`` is True when any of them matches.

    ``user`` is what ``{user}`` stands for (a name without separators); a glob that uses
    ``{user}`` without one is a ValueError, as is an empty glob, a run of three ``*`` or a
    brace that is not part of ``{user}``.
    """

    __slots__ = ("_match", "patterns")
    _match: Callable[[str], object]

    def __init__(self, patterns: Iterable[str], *, user: str | None = None) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        groups = _Groups()
        parts = [glob_regex(tokenize(p, user), groups) for p in self.patterns]
        if parts:
            regex = re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL)
            self._match = regex.fullmatch
        else:
            self._match = _nothing

    def matches(self, topic: str) -> bool:
        return self._match(topic) is not None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __iter__(self) -> Iterator[str]:
        return iter(self.patterns)

    def __repr__(self) -> str:
        return f"GlobSet({list(self.patterns)!r})"


def _nothing(topic: str) -> None:
    return None
