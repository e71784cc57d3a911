"""How each RPC_SERVER_* variable's text is read: one parser per field type, strict."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from rpc_server.config import (
    PARSERS,
    ConfigError,
    Settings,
    require_parsers,
    unknown_variables,
    variable_for,
)

# How a test writes a value of each field type as its variable's text. A new field type
# fails test_every_default_reads_back until it is added here (and to config.PARSERS).
AS_TEXT: dict[str, Callable[[Any], str]] = {
    "str": str,
    "str | None": lambda value: "" if value is None else value,
    "int": str,
    "float": repr,
    "float | None": lambda value: "never" if value is None else repr(value),
    "bool": lambda value: "true" if value else "false",
    "tuple[str, ...]": ",".join,
}

SETTINGS_FIELDS = dataclasses.fields(Settings)


@pytest.mark.parametrize("field", SETTINGS_FIELDS, ids=[f.name for f in SETTINGS_FIELDS])
def test_every_default_reads_back(field: dataclasses.Field[Any]) -> None:
    kind = str(field.type)
    assert kind in PARSERS
    text = AS_TEXT[kind](getattr(Settings(), field.name))
    assert Settings.from_env({variable_for(field.name): text}) == Settings()


def test_a_field_of_a_type_without_a_parser_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Extended:
        port: int = 1
        ratio: complex = 1j
        when: Any = None

    with pytest.raises(TypeError) as raised:
        require_parsers(Extended)
    assert "ratio: complex" in str(raised.value)
    assert "when: Any" in str(raised.value)
    assert "port" not in str(raised.value)
    require_parsers(Settings)  # the real settings pass (also checked at import)


def refusal(variable: str, raw: str) -> str:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: raw})
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__  # no chained parser error either
    return str(raised.value)


@pytest.mark.parametrize("raw", ["abc", "", "8080.0", "8e3", "0x10", "true"])
def test_a_bad_integer(raw: str) -> None:
    assert (
        refusal("RPC_SERVER_WORKERS", raw) == f"RPC_SERVER_WORKERS must be an integer, got {raw!r}"
    )


@pytest.mark.parametrize("raw", ["five", "", "1,5", "inf", "-inf", "nan", "1e400", "true"])
def test_a_bad_number(raw: str) -> None:
    assert (
        refusal("RPC_SERVER_MAIL_LEASE", raw)
        == f"RPC_SERVER_MAIL_LEASE must be a number, got {raw!r}"
    )


@pytest.mark.parametrize("raw", ["maybe", "", "2", "t", "y", "enabled", "tru e"])
def test_a_bad_boolean(raw: str) -> None:
    assert refusal("RPC_SERVER_ACCESS_LOG", raw) == (
        f"RPC_SERVER_ACCESS_LOG must be true or false, got {raw!r}"
    )


@pytest.mark.parametrize("raw", ["soon", "", "forever", "nan", "inf"])
def test_a_bad_number_of_days_or_never(raw: str) -> None:
    assert refusal("RPC_SERVER_TOKEN_TTL", raw) == (
        f"RPC_SERVER_TOKEN_TTL must be a number or never, got {raw!r}"
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("true", True), (" TRUE ", True), ("Yes", True), ("on", True)],
        *[("0", False), ("false", False), ("No", False), (" OFF", False)],
    ],
)
def test_booleans_are_words_in_any_case(raw: str, value: bool) -> None:
    assert Settings.from_env({"RPC_SERVER_DB_PRE_PING": raw}).db_pre_ping is value
    assert Settings.from_env({"RPC_SERVER_ACCESS_LOG": raw}).access_log is value


@pytest.mark.parametrize(
    ("raw", "days"), [("never", None), (" Never ", None), ("30", 30.0), ("0.5", 0.5)]
)
def test_token_ttl_is_days_or_never(raw: str, days: float | None) -> None:
    assert Settings.from_env({"RPC_SERVER_TOKEN_TTL": raw}).token_ttl == days


@pytest.mark.parametrize(("raw", "value"), [(" 42 ", 42), ("+42", 42), ("1_000", 1000)])
def test_integers_read_as_python_reads_them(raw: str, value: int) -> None:
    assert Settings.from_env({"RPC_SERVER_MAX_PENDING_PURCHASES": raw}).max_pending_purchases == (
        value
    )


def test_empty_optional_text_is_unset_and_text_is_taken_as_written() -> None:
    assert Settings.from_env({"RPC_SERVER_SMTP_URL": ""}).smtp_url is None
    assert Settings.from_env({"RPC_SERVER_PUBLIC_URL": ""}).public_url is None
    settings = Settings.from_env(
        {"RPC_SERVER_MAIL_FROM": " ${USER} <$HOME@shop.example> ", "RPC_SERVER_HOST": ""}
    )
    assert settings.mail_from == " ${USER} <$HOME@shop.example> "  # no expansion, no strip
    assert settings.host == ""


def test_lists_are_comma_separated_with_spaces_and_empties_dropped() -> None:
    settings = Settings.from_env({"RPC_SERVER_TRUSTED_PROXIES": " 10.0.0.1, ,192.168.0.0/16,"})
    assert settings.trusted_proxies == ("10.0.0.1", "192.168.0.0/16")


def refusal_of(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(environ)
    return str(raised.value)


def test_the_first_bad_variable_in_field_order_is_named() -> None:
    message = refusal_of({"RPC_SERVER_WORKERS": "two", "RPC_SERVER_PORT": "eighty"})
    assert message == "RPC_SERVER_PORT must be an integer, got 'eighty'"


# Unknown RPC_SERVER_* variables: not an error, but named for the CLI to warn about.


def test_a_typo_is_named_with_the_setting_it_is_closest_to() -> None:
    assert unknown_variables({"RPC_SERVER_DATABSE_URL": "sqlite+aiosqlite:///x"}) == [
        "RPC_SERVER_DATABSE_URL (did you mean RPC_SERVER_DATABASE_URL?)"
    ]
    assert unknown_variables({"rpc_server_port": "1"}) == [
        "rpc_server_port (did you mean RPC_SERVER_PORT?)"
    ]
    assert unknown_variables({"RPC_SERVER_PAYMENT_KEY": "x"}) == [
        "RPC_SERVER_PAYMENT_KEY (did you mean RPC_SERVER_PAYMENT_KEYS?)"
    ]


def test_an_unknown_name_like_no_setting_is_named_alone() -> None:
    assert unknown_variables({"RPC_SERVER_ZZZ": "1"}) == ["RPC_SERVER_ZZZ"]


def test_settings_other_variables_and_the_test_suites_own_are_not_named() -> None:
    environ = {
        "RPC_SERVER_PORT": "1",
        "RPC_SERVER_TOKEN_TTL": "never",
        "RPC_SERVER_TEST_DATABASE_URL": "postgresql+asyncpg://db/test",
        "RPC_SERVER_SOAK_SECONDS": "20",
        "PATH": "/usr/bin",
        "RPC_SERVERPORT": "1",  # not the prefix
    }
    assert unknown_variables(environ) == []
    assert unknown_variables({**environ, "RPC_SERVER_WORKER": "2", "RPC_SERVER_ZZZ": "1"}) == [
        "RPC_SERVER_WORKER (did you mean RPC_SERVER_WORKERS?)",
        "RPC_SERVER_ZZZ",
    ]


def test_an_unknown_variable_is_not_an_error() -> None:
    assert Settings.from_env({"RPC_SERVER_DATABSE_URL": "x"}) == Settings()


def test_unknown_variables_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPC_SERVER_MAX_BODY_BYTE", "10")
    assert "RPC_SERVER_MAX_BODY_BYTE (did you mean RPC_SERVER_MAX_BODY_BYTES?)" in (
        unknown_variables()
    )


@pytest.mark.parametrize(
    "url",
    ["smtp://mailer:s3cr3tPW@mail.example:notaport", "http://mailer:s3cr3tPW@mail.example"],
    ids=["port-not-a-number", "not-smtp"],
)
def test_a_bad_smtp_url_names_the_variable_and_not_its_password(url: str) -> None:
    message = refusal("RPC_SERVER_SMTP_URL", url)
    assert message.startswith("RPC_SERVER_SMTP_URL")
    assert "s3cr3tPW" not in message
