"""Topic globs (docs/security.md, "Topic globs"): the rules, edge cases, and that no
topic can make a check slower than linear."""

from __future__ import annotations

import functools
import random
import time

import pytest

from mq_trio.auth import GlobSet

CASES = [
    # pattern, topic, matches
    ("a.b", "a.b", True),
    ("a.b", "a.bc", False),
    ("a.b", "a/b", False),  # separators are literal characters too
    ("a/b", "a/b", True),
    ("a.*", "a.b", True),
    ("a.*", "a.", True),  # '*' may be empty
    ("a.*", "a.b.c", False),  # '*' does not cross '.'
    ("a.*", "a.b/c", False),  # nor '/'
    ("a.*", "a", False),
    ("*", "", True),
    ("*", "abc", True),
    ("*", "a.b", False),
    ("*.*", "a.b", True),
    ("*.*", ".", True),
    ("a*", "abc", True),
    ("a*c", "abbbc", True),
    ("a*c", "ab.bc", False),
    ("*b*", "abc", True),
    ("*b*", "ac", False),
    ("**", "", True),
    ("**", "a.b/c.d", True),
    ("**.x", "a.b.x", True),  # '**' at the start
    ("**.x", ".x", True),
    ("**.x", "x", False),
    ("**x", "x", True),
    ("a.**", "a.b.c", True),  # at the end
    ("a.**", "a.", True),
    ("a.**", "a", False),
    ("a**", "a", True),
    ("a.**.z", "a.z", False),  # in the middle: both dots are literal
    ("a.**.z", "a..z", True),
    ("a.**.z", "a.b.c.z", True),
    ("a**z", "az", True),
    ("a**z", "a.b/c.z", True),
    ("**.b.**", "a.b.c", True),
    ("**.b.**", "a.bb.c", False),
    ("a.*.c.**", "a.x.c.d.e", True),
    ("a.*.c.**", "a.x.y.c.d", False),
    ("a?b", "a?b", True),  # '?' is literal
    ("a?b", "axb", False),
    ("[ab]", "[ab]", True),  # '[' too
    ("[ab]", "a", False),
    ("a+b(c)|d$^\\", "a+b(c)|d$^\\", True),  # regex specials are literal
    ("a+b", "aab", False),
    ("ünï.*", "ünï.cödé", True),  # unicode
    ("日本.*", "日本.東京", True),
    ("日本.*", "日本.東京.渋谷", False),
    ("*", "emoji🎉", True),
    ("line.*", "line.a\nb", True),  # a newline is an ordinary character
    ("**", "a\n.b", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), CASES)
def test_glob_rules(pattern: str, topic: str, expected: bool) -> None:
    assert GlobSet([pattern]).matches(topic) is expected


def test_empty_set_matches_nothing() -> None:
    globs = GlobSet([])
    assert not globs
    assert not globs.matches("")
    assert not globs.matches("a")


def test_any_of_several() -> None:
    globs = GlobSet(["a.*", "b.**", "c"])
    assert globs.matches("a.x")
    assert globs.matches("b.x.y")
    assert globs.matches("c")
    assert not globs.matches("a.x.y")
    assert not globs.matches("d")
    assert list(globs) == ["a.*", "b.**", "c"]


@pytest.mark.parametrize(
    "pattern",
    ["", "***", "a.***", "{usr}.x", "a{b", "a}b", "{user"],
)
def test_bad_globs(pattern: str) -> None:
    with pytest.raises(ValueError):
        GlobSet([pattern], user="alice")


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="string"):
        GlobSet([1])  # type: ignore[list-item]


def test_user_placeholder() -> None:
    globs = GlobSet(["inbox.{user}.*", "{user}"], user="alice")
    assert globs.matches("inbox.alice.x")
    assert globs.matches("alice")
    assert not globs.matches("inbox.bob.x")
    assert not globs.matches("inbox.{user}.x")


def test_user_is_literal() -> None:
    globs = GlobSet(["inbox.{user}.*"], user="a*b?")
    assert globs.matches("inbox.a*b?.x")
    assert not globs.matches("inbox.aXb?.x")


def test_user_placeholder_needs_a_name_without_separators() -> None:
    with pytest.raises(ValueError, match="identity"):
        GlobSet(["inbox.{user}"])
    with pytest.raises(ValueError, match="separator"):
        GlobSet(["inbox.{user}.*"], user="alice.x")  # would reach into alice.x's inbox
    with pytest.raises(ValueError):
        GlobSet(["inbox.{user}"], user="")
    assert GlobSet(["plain"], user="a.b").matches("plain")  # only {user} needs it


def reference(pattern: str, topic: str) -> bool:
    """The rules as a plain dynamic programme over (pattern, topic) positions."""
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            tokens.append("**")
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1

    @functools.cache
    def match(p: int, t: int) -> bool:
        if p == len(tokens):
            return t == len(topic)
        token = tokens[p]
        if token == "**":
            return match(p + 1, t) or (t < len(topic) and match(p, t + 1))
        if token == "*":
            return match(p + 1, t) or (t < len(topic) and topic[t] not in "./" and match(p, t + 1))
        return t < len(topic) and topic[t] == token and match(p + 1, t + 1)

    return match(0, 0)


def random_glob(rng: random.Random, longest: int) -> str:
    while True:
        parts = rng.choices(["a", "b", ".", "/", "*", "**"], k=rng.randint(1, longest))
        pattern = "".join(parts)
        if "***" not in pattern:
            return pattern


def test_agrees_with_reference(rng: random.Random) -> None:
    for _ in range(4000):
        patterns = [random_glob(rng, 10) for _ in range(rng.randint(1, 3))]
        topic = "".join(rng.choices("ab./", k=rng.randint(0, 12)))
        expected = any(reference(p, topic) for p in patterns)
        assert GlobSet(patterns).matches(topic) is expected, (patterns, topic)


HOSTILE_PATTERNS = [
    "*a*a*a*a*a*a*a*a*b",
    "**a**a**a**a**a**b",
    "**a*a*a*a*b",
    "*a*a*a.**a*a*a*b",
    "**.a*b.**",
    "**a.**a.**a.**b",
    "a**a.*.**b*a",
]
HOSTILE_TOPICS = [
    "a" * 200_000,
    "a." * 100_000,
    "a/a." * 50_000 + "c",
    ("a" * 99 + ".") * 2_000,
]


@pytest.mark.parametrize("pattern", HOSTILE_PATTERNS)
def test_hostile_topics_are_linear(pattern: str) -> None:
    """Backtracking regexes take O(n^k) on these (hours); ours stay linear (ms).
    (Whether they match is the reference test's business; here only the time counts.)"""
    globs = GlobSet([pattern])
    for topic in HOSTILE_TOPICS:
        small = topic[: len(topic) // 10]
        t0 = time.perf_counter()
        globs.matches(small)
        t1 = time.perf_counter()
        globs.matches(topic)
        t2 = time.perf_counter()
        # Ten times the topic: well under a hundred times the time (quadratic), and
        # absolutely small (about 4 ms measured for the worst; loaded machines are slower).
        assert t2 - t1 < 0.5, (pattern, topic[:8], t2 - t1)
        assert t2 - t1 < max(50 * (t1 - t0), 0.2), (pattern, topic[:8], t1 - t0, t2 - t1)


def test_hostile_topics_answer_right() -> None:
    """The same shapes at a size the reference can check."""
    for pattern in HOSTILE_PATTERNS:
        globs = GlobSet([pattern])
        for topic in HOSTILE_TOPICS:
            for end in ("", "b", ".b", "a.b"):
                small = topic[:300] + end
                assert globs.matches(small) is reference(pattern, small), (pattern, small)
