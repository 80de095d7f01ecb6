"""``mq-trio serve`` settings from a config file and the environment (#13 point 1): the
keys come from the serve parser, the layers' precedence (flag > environment > file >
default, a flag equal to its default included), values judged as on the command line,
errors for unknown keys and variables, and ``--print-config`` as a reusable file.

In process (``serve_settings``, ``main``) with an explicit environment; the real
``mq-trio serve`` subprocess is in ``test_config_serve.py``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from support import SEED_VARIABLE

from mq_trio.cli import build_parser, config_from_args, main
from mq_trio.cli._args import PASSWORD_VARIABLE, TOKEN_VARIABLE
from mq_trio.cli._config import (
    DEFAULT,
    OTHER_VARIABLES,
    Setting,
    SettingError,
    Settings,
    settings_of,
)
from mq_trio.cli._main import serve_settings
from mq_trio.cli._stats import URL_VARIABLE
from mq_trio.server import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve: argparse.ArgumentParser = sub.choices["serve"]
    return serve


SETTINGS = settings_of(serve_parser())
KEYS = [s.key for s in SETTINGS]


@pytest.fixture(autouse=True)
def no_settings_in_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``main`` reads os.environ (and tox passes MQ_TRIO_* through): start clean."""
    for name in list(os.environ):
        if name.startswith("MQ_TRIO_"):
            monkeypatch.delenv(name)
    yield


def layers(*flags: str, env: dict[str, str] | None = None, config: Path | None = None
           ) -> tuple[argparse.Namespace, Settings]:
    argv = ["serve", *(["--config", str(config)] if config else []), *flags]
    return serve_settings(build_parser().parse_args(argv), env or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_flag_is_a_setting_with_a_key_and_a_variable() -> None:
    options = {
        o for a in serve_parser()._actions for o in a.option_strings if o.startswith("--")
    }
    assert {s.flag for s in SETTINGS} == options - {"--help", "--config", "--print-config"}
    dests = {s.dest for s in SETTINGS}
    assert {f.name for f in attrs.fields(Config)} <= dests
    assert {"log_level", "log_format"} <= dests
    by_key = {s.key: s for s in SETTINGS}
    assert by_key["auth"].dest == "auth_file"
    assert by_key["max-pending-bytes"].variable == "MQ_TRIO_MAX_PENDING_BYTES"
    assert by_key["ws-allowed-origins"].variable == "MQ_TRIO_WS_ALLOWED_ORIGINS"
    variables = [s.variable for s in SETTINGS]
    assert len(set(variables)) == len(variables)
    assert not set(variables) & OTHER_VARIABLES


def test_nothing_set_gives_the_defaults() -> None:
    args, layered = layers()
    assert config_from_args(args) == Config()
    assert (args.log_level, args.log_format) == ("info", "text")
    assert set(layered.sources().values()) == {DEFAULT}
    assert layered.config_file is None


def test_precedence_flag_over_environment_over_file_over_default(tmp_path: Path) -> None:
    config = write(tmp_path / "mq.toml", """
        port = 1111
        cache-size = 11
        max-topics = 77
        log-level = "debug"
    """)
    env = {"MQ_TRIO_PORT": "2222", "MQ_TRIO_CACHE_SIZE": "22", "MQ_TRIO_LOG_LEVEL": "error"}
    # --port and --log-level repeat their defaults: given, they still win.
    args, layered = layers("--port", "7000", "--log-level", "info", env=env, config=config)
    assert (args.port, args.cache_size, args.max_topics, args.max_connections) == (
        7000, 22, 77, Config().max_connections)
    assert args.log_level == "info"
    sources = layered.sources()
    assert sources["port"] == "--port"
    assert sources["log-level"] == "--log-level"
    assert sources["cache-size"] == "MQ_TRIO_CACHE_SIZE"
    assert sources["max-topics"] == str(config)
    assert sources["max-connections"] == DEFAULT
    # Without the flags the environment wins over the file.
    args, layered = layers(env=env, config=config)
    assert (args.port, args.log_level) == (2222, "error")
    assert layered.sources()["port"] == "MQ_TRIO_PORT"
    # Without the environment the file wins over the defaults.
    args, layered = layers(config=config)
    assert (args.port, args.cache_size, args.log_level) == (1111, 11, "debug")


def test_a_switch_given_as_a_flag_wins_over_false_in_the_environment(tmp_path: Path) -> None:
    args, layered = layers("--accept-data-loss", env={"MQ_TRIO_ACCEPT_DATA_LOSS": "false"})
    assert args.accept_data_loss is True
    assert layered.sources()["accept-data-loss"] == "--accept-data-loss"
    config = write(tmp_path / "mq.toml", "accept-data-loss = true\n")
    args, layered = layers(env={"MQ_TRIO_ACCEPT_DATA_LOSS": "0"}, config=config)
    assert args.accept_data_loss is False
    assert layered.sources()["accept-data-loss"] == "MQ_TRIO_ACCEPT_DATA_LOSS"


def test_file_values_in_toml_types_and_as_command_line_strings(tmp_path: Path) -> None:
    config = write(tmp_path / "mq.toml", """
        host = "0.0.0.0"
        max-pending-bytes = "16MiB"
        max_line_bytes = 65536                    # underscores: the same key
        shutdown-grace = 2                        # an integer for seconds
        ws-port = "7001"                          # a string, as on the command line
        ws-allowed-origins = ["https://App.example", "http://x:1"]
        fsync = "always"
        accept-data-loss = true
        auth = "/etc/mq-trio/auth.toml"
    """)
    args, _ = layers(config=config)
    assert (args.host, args.max_pending_bytes, args.max_line_bytes) == (
        "0.0.0.0", 16 << 20, 65536)
    assert args.shutdown_grace == 2.0 and isinstance(args.shutdown_grace, float)
    assert args.ws_port == 7001
    assert args.ws_allowed_origins == ("https://app.example", "http://x:1")  # normalised
    assert (args.fsync, args.accept_data_loss, args.auth_file) == (
        "always", True, "/etc/mq-trio/auth.toml")
    comma = write(tmp_path / "comma.toml", 'ws-allowed-origins = "https://a.example, *"\n')
    assert layers(config=comma)[0].ws_allowed_origins == ("https://a.example", "*")


@pytest.mark.parametrize(
    "line, reason",
    [
        ('port = "x"', "port: not a port number (0-65535): 'x'"),
        ("port = 70000", "port: not a port number"),
        ("port = true", "port: expected a port number (0-65535), got a boolean (true)"),
        ("cache-size = 1.5", "cache-size: invalid int value: '1.5'"),
        ("cache_size = \"many\"", "cache_size: invalid int value: 'many'"),
        ('max-pending-bytes = "12xyz"', "max-pending-bytes: not a size in bytes: '12xyz'"),
        ('fsync = "sometimes"', "fsync: invalid choice: 'sometimes' (choose from always, "
         "everysec, never)"),
        ('log-level = "loud"', "log-level: invalid choice: 'loud'"),
        ('accept-data-loss = "yes"', "accept-data-loss: expected true or false, got a string"),
        ("host = 5", "host: expected a string, got a number (5)"),
        ("data-dir = [\"a\"]", "data-dir: expected a string, got an array"),
        ('ws-allowed-origins = ["ftp://x"]', "ws-allowed-origins: not an origin"),
        ("ws-allowed-origins = [1]", "ws-allowed-origins: expected a comma-separated string "
         "or an array of strings, got an array"),
        ("shutdown-grace = 1979-05-27", "shutdown-grace: expected a number, got a date"),
        ("prot = 7000", "unknown setting 'prot'; did you mean port?"),
        ("max-pending = 1", "unknown setting 'max-pending'; did you mean max-pending-bytes?"),
        ("[serve]\nport = 1", "unknown setting 'serve' (a table: settings are top-level keys)"),
        ("config = 'other.toml'", "unknown setting 'config'"),
        ("port = 1\nport = 2", "not valid TOML"),
        ("max-line-bytes = 1\nmax_line_bytes = 2", "max-line-bytes given twice (as "
         "'max-line-bytes' and 'max_line_bytes')"),
    ],
)
def test_a_bad_file_names_the_file_the_key_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    config = write(tmp_path / "mq.toml", line + "\n")
    with pytest.raises(SettingError) as exc:
        layers(config=config)
    assert str(exc.value).startswith(f"config file {config}: ")
    assert reason in str(exc.value)
    # The command: one line, exit status 2, nothing served.
    assert main(["serve", "--port", "0", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"mq-trio: {exc.value}\n"


def test_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["serve", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"mq-trio: config file {missing}: cannot read it: No such file or directory\n")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'host = "caf\xe9"\n')
    assert main(["serve", "--config", str(latin)]) == 2
    assert capsys.readouterr().err == f"mq-trio: config file {latin}: not UTF-8 text\n"


def test_environment_values_and_what_counts_as_a_switch() -> None:
    env = {
        "MQ_TRIO_MAX_PENDING_BYTES": "8MiB",
        "MQ_TRIO_WS_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "MQ_TRIO_SHUTDOWN_GRACE": "0.5",
        "MQ_TRIO_HOST": "",  # empty: unset
    }
    for word, expected in (("true", True), ("1", True), ("ON", True), ("yes", True),
                           ("false", False), ("0", False), ("off", False), ("No", False)):
        env["MQ_TRIO_ACCEPT_DATA_LOSS"] = word
        args, layered = layers(env=env)
        assert args.accept_data_loss is expected, word
    assert (args.max_pending_bytes, args.shutdown_grace, args.host) == (8 << 20, 0.5,
                                                                       Config().host)
    assert args.ws_allowed_origins == ("https://a.example", "https://b.example")
    assert layered.sources()["host"] == DEFAULT


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MQ_TRIO_PROT": "7000"}, "unknown environment variable MQ_TRIO_PROT; did you mean "
         "MQ_TRIO_PORT?"),
        ({"MQ_TRIO_MAX_PENDING_BYTE": "1"}, "did you mean MQ_TRIO_MAX_PENDING_BYTES?"),
        ({"MQ_TRIO_port": "7000"}, "unknown environment variable MQ_TRIO_port"),
        ({"MQ_TRIO_PORT": "70000"}, "environment variable MQ_TRIO_PORT: not a port number"),
        ({"MQ_TRIO_ACCEPT_DATA_LOSS": "maybe"}, "environment variable "
         "MQ_TRIO_ACCEPT_DATA_LOSS: expected true or false (or 1/0, yes/no, on/off), got "
         "'maybe'"),
        ({"MQ_TRIO_FSYNC": "sometimes"}, "MQ_TRIO_FSYNC: invalid choice: 'sometimes'"),
    ],
)
def test_bad_environment(env: dict[str, str], message: str,
                         monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingError) as exc:
        layers(env=env)
    assert message in str(exc.value)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err == f"mq-trio: {exc.value}\n"


def test_other_commands_variables_are_not_settings_nor_errors() -> None:
    env = {name: "x" for name in OTHER_VARIABLES if name != "MQ_TRIO_CONFIG"}
    assert {TOKEN_VARIABLE, PASSWORD_VARIABLE, URL_VARIABLE, SEED_VARIABLE} <= set(env)
    args, layered = layers(env={**env, "PATH": "/bin", "MQ_TRIOX": "1"})
    assert config_from_args(args) == Config()
    assert set(layered.sources().values()) == {DEFAULT}


def test_the_config_variable_names_the_file_and_the_flag_wins(tmp_path: Path) -> None:
    by_variable = write(tmp_path / "env.toml", "port = 1111\n")
    by_flag = write(tmp_path / "flag.toml", "port = 2222\n")
    args, layered = layers(env={"MQ_TRIO_CONFIG": str(by_variable)})
    assert args.port == 1111
    assert (layered.config_file, layered.config_named_by) == (str(by_variable),
                                                              "MQ_TRIO_CONFIG")
    args, layered = layers(env={"MQ_TRIO_CONFIG": str(by_variable)}, config=by_flag)
    assert args.port == 2222
    assert (layered.config_file, layered.config_named_by) == (str(by_flag), "--config")
    assert layered.sources()["port"] == str(by_flag)


def parse_printed(text: str) -> dict[str, tuple[Any, str]]:
    """key -> (value, source) from --print-config output, read by a TOML parser: the
    output must be TOML apart from its comments."""
    values = tomllib.loads(text)
    sources: dict[str, tuple[Any, str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(#\s*)?([a-z-]+) = (.*?)\s+# (\S+)", line)
        if m:
            sources[m.group(2)] = (values.get(m.group(2)), m.group(4))
    return sources


def test_print_config_shows_values_and_sources_and_serves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "mq.toml", 'max-pending-bytes = "16MiB"\nws-port = 7001\n'
                   'ws-allowed-origins = ["https://a.example"]\nshutdown-grace = 2\n')
    monkeypatch.setenv("MQ_TRIO_CACHE_SIZE", "5")
    assert main(["serve", "--config", str(config), "--print-config", "--port", "1",
                 "--accept-data-loss"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no logging set up, nothing listened on
    printed = parse_printed(out)
    assert set(printed) == set(KEYS)
    assert printed["port"] == (1, "--port")
    assert printed["accept-data-loss"] == (True, "--accept-data-loss")
    assert printed["cache-size"] == (5, "MQ_TRIO_CACHE_SIZE")
    assert printed["max-pending-bytes"] == ("16MiB", str(config))
    assert printed["ws-port"] == (7001, str(config))
    assert printed["ws-allowed-origins"] == (["https://a.example"], str(config))
    assert printed["shutdown-grace"] == (2.0, str(config))
    assert printed["max-line-bytes"] == ("1MiB", DEFAULT)
    assert printed["data-dir"] == (None, DEFAULT)  # unset: a comment line
    assert "# data-dir = (not set)" in out
    assert f"config file {config} (from --config)" in out.splitlines()[0]


def test_print_config_output_is_a_config_file_giving_the_same_settings(
    tmp_path: Path,
) -> None:
    config = write(tmp_path / "mq.toml", """
        host = "::1"
        max-pending-bytes = 1000000       # not a whole number of KiB: printed as bytes
        max-cache-bytes = "3MiB"
        ws-allowed-origins = ["https://a.example", "*"]
        ws-ping-interval = 0.25
        data-dir = "dir with \\"quotes\\" and \\\\ and \\t"
        fsync = "never"
        accept-data-loss = true
        log-format = "json"
    """)
    args, layered = layers("--port", "0", env={"MQ_TRIO_MAX_TOPICS": "9"}, config=config)
    saved = write(tmp_path / "saved.toml", layered.render())
    again, relayered = layers(config=saved)
    for s in SETTINGS:
        assert getattr(again, s.dest) == getattr(args, s.dest), s.key
        expected = DEFAULT if getattr(args, s.dest) is None else str(saved)
        assert relayered.sources()[s.key] == expected, s.key
    assert args.data_dir == 'dir with "quotes" and \\ and \t'


def test_print_config_with_settings_that_cannot_work_together_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "mq.toml", 'max-line-bytes = "1k"\nmax-pending-bytes = "1k"\n')
    assert main(["serve", "--config", str(config), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert 'max-pending-bytes = "1KiB"' in out  # printed all the same, to see why
    assert err == ("mq-trio: invalid settings: max pending bytes must be at least twice max "
                   "line bytes\n")


def test_serve_help_names_the_config_file_the_variables_and_print_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--config FILE", "--print-config", "MQ_TRIO_CONFIG",
                   "MQ_TRIO_ and the name in capitals", "A flag wins over the environment, "
                   "which wins over the file"):
        assert phrase in text


def docs_example() -> str:
    """The example config file in docs/operations.md ("Configuration file and
    environment")."""
    text = DOCS.read_text()
    section = text.split("## Configuration file and environment", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert m, "no ```toml block in the section"
    return m.group(1)


def test_the_docs_example_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    example = docs_example()
    active = tomllib.loads(example)
    commented = dict(re.findall(r"(?m)^# ?([a-z-]+) = (.+?)(?:\s+#.*)?$", example))
    # Every setting once: set to its default, or (unset by default) as a commented line.
    assert sorted([*active, *commented]) == sorted(KEYS)
    by_key = {s.key: s for s in SETTINGS}
    assert all(by_key[key].default is None for key in commented), commented
    args, layered = layers(config=write(tmp_path / "example.toml", example))
    for s in SETTINGS:
        assert getattr(args, s.dest) == s.default, s.key
    # The commented lines are valid values too, once uncommented.
    uncommented = "\n".join(f"{key} = {value}" for key, value in commented.items())
    values = tomllib.loads(uncommented)
    for key, value in values.items():
        by_key[key].from_toml(value)


def test_a_setting_knows_what_it_expects() -> None:
    by_key: dict[str, Setting] = {s.key: s for s in SETTINGS}
    assert by_key["accept-data-loss"].expected() == "true or false"
    assert by_key["cache-size"].expected() == "an integer"
    assert by_key["fsync"].expected() == "one of always, everysec, never"
    assert by_key["max-job-bytes"].to_toml(512 << 20) == '"512MiB"'
    assert by_key["shutdown-grace"].to_toml(float("inf")) == "inf"
    assert by_key["host"].to_toml("a\x7fb\x01") == '"a\\u007fb\\u0001"'
