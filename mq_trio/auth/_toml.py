"""Reading the auth file's TOML with one-line errors that say which file, where and why."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from ._errors import AuthConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_path(*keys: str) -> str:
    """``users.alice`` as TOML writes it (quoted when a key is not bare)."""
    return ".".join(k if _BARE_KEY.fullmatch(k) else _quote(k) for k in keys)


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_toml(path: Path) -> dict[str, object]:
    """The file's tables; AuthConfigError when it is missing, unreadable or not TOML."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"auth file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        tables: dict[str, object] = tomllib.loads(data.decode("utf-8"))
        return tables
    except UnicodeDecodeError:
        raise AuthConfigError(f"auth file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"auth file {path}: not valid TOML: {exc}") from None


class Table:
    """One table of the file: typed getters, and ``done()`` to refuse unknown keys (a
    misspelt ``publish_deny`` must not silently allow what it meant to deny)."""

    def __init__(self, path: Path, where: tuple[str, ...], data: object) -> None:
        self.path = path
        self.where = where
        if not isinstance(data, Mapping):
            self.fail(None, f"must be a table, not {_kind(data)}")
        self.data: Mapping[str, object] = data
        self._seen: set[str] = set()

    def fail(self, key: str | None, why: str) -> NoReturn:
        where = key_path(*self.where)
        if key is None:
            at = f"[{where}]" if where else "top level"
        else:
            at = f"[{where}] {key_path(key)}" if where else key_path(key)
        raise AuthConfigError(f"auth file {self.path}: {at}: {why}")

    def raw(self, key: str) -> object:
        self._seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_kind(value)}")
        if not value:
            self.fail(key, "must not be empty")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"must be a list of strings, not {_kind(value)}")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number of seconds, not {_kind(value)}")
        if not 0 <= value < 1e9:
            self.fail(key, "must be 0 or more seconds")
        return float(value)

    def subtables(self, key: str) -> list[Table]:
        """``[key.NAME]`` tables, one per name."""
        value = self.raw(key)
        if value is None:
            return []
        outer = Table(self.path, (*self.where, key), value)
        for name in outer.data:
            outer._seen.add(name)
        return [Table(self.path, (*self.where, key, name), v) for name, v in outer.data.items()]

    def subtable(self, key: str) -> Table | None:
        value = self.raw(key)
        return None if value is None else Table(self.path, (*self.where, key), value)

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            known = ", ".join(sorted(self._seen))
            self.fail(unknown[0], f"unknown key (known here: {known})")

    @property
    def name(self) -> str:
        return self.where[-1]


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        odd = next((v for v in value if not isinstance(v, str)), None)
        return "a list of strings" if odd is None else f"a list containing {_kind(odd)}"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__
