"""``mq-trio serve`` settings in layers: defaults < config file < environment < flags.

Every ``serve`` flag is a setting, and the settings are read off the parser rather than
listed here, so a flag added later is at once a config-file key and an environment
variable: the key is the flag without its ``--`` (``max-pending-bytes``; ``max_pending_bytes``
is the same key), the variable ``MQ_TRIO_`` and the key in capitals with ``_`` for ``-``
(``MQ_TRIO_MAX_PENDING_BYTES``). Values go through the flag's own argparse ``type`` (and
``choices``), so ``"8MiB"``, a port out of range or a bad origin is judged the same way
wherever it comes from. Unknown keys and unknown ``MQ_TRIO_*`` variables are errors with a
suggestion: a typo silently ignored would run a server with settings nobody chose.

To know which flags were on the command line (a flag repeating its default still wins over
the environment), the serve parser's store actions record themselves as they run
(:func:`track_flags`).
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs

from ._args import PASSWORD_VARIABLE, TOKEN_VARIABLE, byte_size, port_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

PREFIX = "MQ_TRIO_"
#: Names the config file when ``--config`` is not given.
CONFIG_VARIABLE = "MQ_TRIO_CONFIG"
#: ``MQ_TRIO_*`` variables that are not serve settings and must not be refused.
OTHER_VARIABLES = frozenset({
    CONFIG_VARIABLE,
    # the client commands' credentials (cli/_args.py) and mq-trio stats' URL (cli/_stats.py)
    TOKEN_VARIABLE, PASSWORD_VARIABLE, "MQ_TRIO_HTTP_URL",
    # what mq-trio work gives a job's handler (cli/_work.py)
    "MQ_TRIO_TOPIC", "MQ_TRIO_INDEX", "MQ_TRIO_DELIVERIES", "MQ_TRIO_FROM_TOPIC",
    "MQ_TRIO_FROM_INDEX",
    # the test suite's (tox passes MQ_TRIO_* through, and the tests start servers)
    "MQ_TRIO_TEST_SEED", "MQ_TRIO_TEST_CLUSTER", "MQ_TRIO_BIG_HISTORY", "MQ_TRIO_REQUIRE_BROWSER",
    "MQ_TRIO_CHROMIUM",
    "MQ_TRIO_DOCS_SCREENSHOT",
})
#: Serve flags about the configuration itself (``dest``), not settings.
NOT_SETTINGS = frozenset({"help", "config", "print_config"})
#: Where a value came from when nothing set it.
DEFAULT = "default"

#: The namespace attribute where tracked flags note themselves: dest -> option string.
_GIVEN = "_flags_given"
#: Argument types that parse a comma-separated list (a config file may give an array).
_LIST_TYPES: set[Callable[[str], Any]] = set()
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingError(Exception):
    """A config file, variable or value that cannot be used; one line, for exit status 2."""


def list_type(func: Callable[[str], Any]) -> Callable[[str], Any]:
    """Mark an argparse type that takes ``a,b,c``: a config file may give a TOML array."""
    _LIST_TYPES.add(func)
    return func


def format_size(size: int) -> str:
    """Bytes as the README writes them: ``8MiB``, ``1GiB``, ``64KiB`` (raw if uneven)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


# --- which flags were given --------------------------------------------------------------


def _note(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    given = getattr(namespace, _GIVEN, None)
    if given is None:
        given = {}
        setattr(namespace, _GIVEN, given)
    given[dest] = option_string or dest


class _TrackedStore(argparse._StoreAction):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        _note(namespace, self.dest, option_string)
        super().__call__(parser, namespace, values, option_string)


class _TrackedStoreTrue(argparse._StoreTrueAction):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        _note(namespace, self.dest, option_string)
        super().__call__(parser, namespace, values, option_string)


class _TrackedStoreFalse(argparse._StoreFalseAction):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        _note(namespace, self.dest, option_string)
        super().__call__(parser, namespace, values, option_string)


def track_flags(parser: argparse.ArgumentParser) -> None:
    """Make the parser's plain flags note that they were given (call before adding them;
    argument groups share the parser's registry). Only an action that runs is noted, so
    ``--port 7000`` counts as given although 7000 is the default."""
    parser.register("action", None, _TrackedStore)
    parser.register("action", "store", _TrackedStore)
    parser.register("action", "store_true", _TrackedStoreTrue)
    parser.register("action", "store_false", _TrackedStoreFalse)


def flags_given(args: argparse.Namespace) -> dict[str, str]:
    """dest -> the option string used, for each tracked flag on the command line."""
    return dict(getattr(args, _GIVEN, None) or {})


# --- the settings ------------------------------------------------------------------------


@attrs.frozen
class Setting:
    """One serve flag seen as a setting."""

    key: str
    action: argparse.Action

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def flag(self) -> str:
        return f"--{self.key}"

    @property
    def variable(self) -> str:
        return PREFIX + self.key.upper().replace("-", "_")

    @property
    def switch(self) -> bool:
        """A flag without a value (``--accept-data-loss``): true or false elsewhere."""
        return self.action.nargs == 0

    @property
    def default(self) -> Any:
        value = self.action.default
        if isinstance(value, str) and self.action.type is not None:
            return self.from_text(value)  # as argparse converts a string default
        return value

    def expected(self) -> str:
        """What a value must be, for error messages."""
        kind = self.action.type
        if self.switch:
            return "true or false"
        if self.action.choices is not None:
            return "one of " + ", ".join(map(str, self.action.choices))
        if kind is None:
            return "a string"
        if kind is int:
            return "an integer"
        if kind is float:
            return "a number"
        if kind in _LIST_TYPES:
            return "a comma-separated string or an array of strings"
        if kind is byte_size:
            return "a size (65536, \"64k\", \"8MiB\")"
        if kind is port_number:
            return "a port number (0-65535)"
        what = str(self.action.metavar or self.dest).lower()
        return f"a {what}"

    def from_text(self, text: str) -> Any:
        """A string value as the flag's argparse type and choices take it; ValueError
        with argparse's reason otherwise."""
        kind = cast("Callable[[str], Any] | None", self.action.type)
        value: Any = text
        if kind is not None:
            try:
                value = kind(text)
            except argparse.ArgumentTypeError as exc:
                raise ValueError(str(exc)) from None
            except (TypeError, ValueError):
                name = getattr(kind, "__name__", repr(kind))
                raise ValueError(f"invalid {name} value: {text!r}") from None
        choices = self.action.choices
        if choices is not None and value not in choices:
            shown = ", ".join(map(str, choices))
            raise ValueError(f"invalid choice: {value!r} (choose from {shown})")
        return value

    def from_toml(self, value: object) -> Any:
        """A config file's value: TOML's own types where natural, strings as on the
        command line; ValueError with the reason otherwise."""
        if self.switch:
            if isinstance(value, bool):
                return self.action.const if value else self.action.default
            raise ValueError(f"expected true or false, got {_toml_kind(value)}")
        if isinstance(value, bool):
            raise ValueError(f"expected {self.expected()}, got {_toml_kind(value)}")
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, (int, float)) and self.action.type is not None:
            return self.from_text(str(value))
        if (
            isinstance(value, list)
            and self.action.type in _LIST_TYPES
            and all(isinstance(item, str) for item in value)
        ):
            return self.from_text(",".join(value))
        raise ValueError(f"expected {self.expected()}, got {_toml_kind(value)}")

    def from_variable(self, text: str) -> Any:
        """An environment variable's value (always a string)."""
        if self.switch:
            word = text.strip().lower()
            if word in _TRUE:
                return self.action.const
            if word in _FALSE:
                return self.action.default
            raise ValueError(f"expected true or false (or 1/0, yes/no, on/off), got {text!r}")
        return self.from_text(text)

    def to_toml(self, value: Any) -> str | None:
        """The value as a TOML value (sizes as ``"8MiB"``); None for an unset value."""
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int) and self.action.type is byte_size:
            text = format_size(value)
            return text if text.isdigit() else toml_string(text)
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        if isinstance(value, (tuple, list)):
            return "[" + ", ".join(toml_string(str(item)) for item in value) + "]"
        return toml_string(str(value))


def _toml_kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def toml_string(text: str) -> str:
    """A TOML basic string (escapes what TOML requires escaped: ``"``, ``\\``, controls)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def settings_of(parser: argparse.ArgumentParser) -> list[Setting]:
    """The serve parser's settings, in its order: every option but help and --config."""
    settings = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_SETTINGS:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        settings.append(Setting((longs or action.option_strings)[0].lstrip("-"), action))
    return settings


# --- the layers --------------------------------------------------------------------------


@attrs.frozen
class Resolved:
    """A setting's effective value and where it came from: ``default``, the config
    file's path, an environment variable's name or the flag."""

    setting: Setting
    value: Any
    source: str


@attrs.frozen
class Settings:
    """The effective settings, and the config file (with what named it) if any."""

    resolved: tuple[Resolved, ...]
    config_file: str | None = None
    config_named_by: str | None = None

    def apply(self, args: argparse.Namespace) -> argparse.Namespace:
        """A copy of ``args`` with every setting's effective value."""
        merged = argparse.Namespace(**vars(args))
        for item in self.resolved:
            setattr(merged, item.setting.dest, item.value)
        return merged

    def sources(self) -> dict[str, str]:
        return {item.setting.key: item.source for item in self.resolved}

    def render(self) -> str:
        """``key = value  # source`` lines: TOML that can be saved as a config file; an
        unset setting (TOML has no null) as a comment."""
        if self.config_file is None:
            origin = "no config file"
        else:
            origin = f"config file {self.config_file} (from {self.config_named_by})"
        lines = [f"# mq-trio serve: effective settings; {origin}"]
        body = []
        for item in self.resolved:
            shown = item.setting.to_toml(item.value)
            if shown is None:
                body.append((f"# {item.setting.key} = (not set)", item.source))
            else:
                body.append((f"{item.setting.key} = {shown}", item.source))
        width = max((len(text) for text, _ in body if len(text) <= 40), default=0)
        lines += [f"{text.ljust(width)}  # {source}" for text, source in body]
        return "\n".join(lines) + "\n"


def _suggestion(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def read_config(path: str) -> dict[str, Any]:
    """The file's TOML; SettingError when it is missing, unreadable or not TOML."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingError(f"config file {path}: not UTF-8 text") from None
    try:
        tables: dict[str, Any] = tomllib.loads(text)
        return tables
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"config file {path}: not valid TOML: {exc}") from None


def file_values(settings: Sequence[Setting], path: str) -> dict[str, Any]:
    """key -> value from the config file; SettingError for an unknown key (with a
    suggestion), a key given twice (``max-line-bytes`` and ``max_line_bytes``) or a bad
    value."""
    by_key = {s.key: s for s in settings}
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw, value in read_config(path).items():
        key = raw.replace("_", "-")
        setting = by_key.get(key)
        if setting is None:
            hint = _suggestion(key, list(by_key))
            if isinstance(value, dict):
                hint += " (a table: settings are top-level keys)"
            raise SettingError(f"config file {path}: unknown setting {raw!r}{hint}")
        if key in spelled:
            raise SettingError(
                f"config file {path}: {key} given twice (as {spelled[key]!r} and {raw!r})"
            )
        spelled[key] = raw
        try:
            values[key] = setting.from_toml(value)
        except ValueError as exc:
            raise SettingError(f"config file {path}: {raw}: {exc}") from None
    return values


def environment_values(settings: Sequence[Setting], environ: Mapping[str, str]
                       ) -> dict[str, tuple[Any, str]]:
    """key -> (value, variable) from ``MQ_TRIO_*`` variables; an empty one counts as
    unset. SettingError for an unknown ``MQ_TRIO_*`` variable or a bad value."""
    by_variable = {s.variable: s for s in settings}
    values: dict[str, tuple[Any, str]] = {}
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in OTHER_VARIABLES:
            continue
        setting = by_variable.get(name)
        if setting is None:
            hint = _suggestion(name, [*by_variable, *sorted(OTHER_VARIABLES)])
            raise SettingError(f"unknown environment variable {name}{hint}")
        text = environ[name]
        if text == "":
            continue
        try:
            values[setting.key] = (setting.from_variable(text), name)
        except ValueError as exc:
            raise SettingError(f"environment variable {name}: {exc}") from None
    return values


def resolve(settings: Sequence[Setting], args: argparse.Namespace,
            environ: Mapping[str, str], config: str | None = None) -> Settings:
    """Each setting from its highest layer: flag, else environment, else the config
    file (``--config``, else ``$MQ_TRIO_CONFIG``), else its default."""
    named_by: str | None = None
    if config is not None:
        named_by = "--config"
    elif environ.get(CONFIG_VARIABLE):
        config, named_by = environ[CONFIG_VARIABLE], CONFIG_VARIABLE
    from_file = file_values(settings, config) if config is not None else {}
    from_env = environment_values(settings, environ)
    given = flags_given(args)
    resolved = []
    for s in settings:
        if s.dest in given:
            item = Resolved(s, getattr(args, s.dest), given[s.dest])
        elif s.key in from_env:
            item = Resolved(s, *from_env[s.key])
        elif s.key in from_file:
            assert config is not None
            item = Resolved(s, from_file[s.key], config)
        else:
            item = Resolved(s, s.default, DEFAULT)
        resolved.append(item)
    return Settings(tuple(resolved), config, named_by)
