"""Settings read once from RPC_SERVER_* variables."""

from __future__ import annotations

import dataclasses

import pytest

from rpc_server.config import DEFAULT_DATABASE_URL, ConfigError, Settings
from tests.payments import OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.frontend_url == "http://localhost:3000"
    assert settings.log_level == "INFO"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.max_batch_length == 100


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "RPC_SERVER_DATABASE_URL": "postgresql+asyncpg://db/shop",
            "RPC_SERVER_HOST": "0.0.0.0",
            "RPC_SERVER_PORT": "9000",
            "RPC_SERVER_FRONTEND_URL": "https://shop.example",
            "RPC_SERVER_LOG_LEVEL": "DEBUG",
            "RPC_SERVER_MAX_BODY_BYTES": "2048",
            "RPC_SERVER_MAX_BATCH_LENGTH": "5",
            "UNRELATED": "ignored",
        }
    )
    assert settings == Settings(
        database_url="postgresql+asyncpg://db/shop",
        host="0.0.0.0",
        port=9000,
        frontend_url="https://shop.example",
        log_level="DEBUG",
        max_body_bytes=2048,
        max_batch_length=5,
    )
    assert isinstance(settings.port, int)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPC_SERVER_PORT", "8181")
    monkeypatch.delenv("RPC_SERVER_HOST", raising=False)
    settings = Settings.from_env()
    assert settings.port == 8181
    assert settings.host == "127.0.0.1"


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"RPC_SERVER_PORT": "9000"}, port=9001, host="::1")
    assert (settings.port, settings.host) == (9001, "::1")


@pytest.mark.parametrize(
    "variable", ["RPC_SERVER_PORT", "RPC_SERVER_MAX_BODY_BYTES", "RPC_SERVER_MAX_BATCH_LENGTH"]
)
@pytest.mark.parametrize("raw", ["abc", "", "8080.0", "8e3"])
def test_a_bad_integer_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: raw})
    assert variable in str(raised.value)
    assert repr(raw) in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("RPC_SERVER_PORT", "0"),
        ("RPC_SERVER_PORT", "65536"),
        ("RPC_SERVER_PORT", "-1"),
        ("RPC_SERVER_MAX_BODY_BYTES", "0"),
        ("RPC_SERVER_MAX_BATCH_LENGTH", "0"),
    ],
)
def test_out_of_range_values_name_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: raw})


@pytest.mark.parametrize("port", ["1", "65535"])
def test_port_bounds(port: str) -> None:
    assert Settings.from_env({"RPC_SERVER_PORT": port}).port == int(port)


def test_settings_are_immutable() -> None:
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


# Payment keys and tolerance (issue 14).


def test_payment_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.payment_keys == ()
    assert settings.payment_tolerance == 300
    assert settings.allow_demo is False


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        (TEST_PAYMENT_KEY, (TEST_PAYMENT_KEY,)),
        (f"{TEST_PAYMENT_KEY},{OTHER_PAYMENT_KEY}", (TEST_PAYMENT_KEY, OTHER_PAYMENT_KEY)),
        (f" {OTHER_PAYMENT_KEY} , ,{TEST_PAYMENT_KEY},", (OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY)),
        ("", ()),
        (" , ", ()),
    ],
    ids=["one", "two-in-order", "spaces-and-empties", "empty", "only-commas"],
)
def test_payment_keys_are_comma_separated(raw: str, keys: tuple[str, ...]) -> None:
    assert Settings.from_env({"RPC_SERVER_PAYMENT_KEYS": raw}).payment_keys == keys


SECRET_TEXT = "s3cr3tVALUEthatMustNotLeak"


@pytest.mark.parametrize(
    "bad",
    [
        SECRET_TEXT,  # no whsec_ prefix
        "whsec_" + SECRET_TEXT + "!!",  # not base64
        "whsec_" + "c2VjcmV0",  # base64 of 6 bytes: too short
        "WHSEC_" + TEST_PAYMENT_KEY[len("whsec_") :],
    ],
    ids=["no-prefix", "not-base64", "too-short", "upper-prefix"],
)
def test_a_bad_payment_key_is_a_config_error_that_does_not_show_it(bad: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"RPC_SERVER_PAYMENT_KEYS": f"{TEST_PAYMENT_KEY},{bad}"})
    message = str(raised.value)
    assert "RPC_SERVER_PAYMENT_KEYS" in message
    assert "key 2" in message  # which one, by position
    assert bad not in message
    assert bad[len("whsec_") :] not in message
    assert TEST_PAYMENT_KEY not in message
    assert raised.value.__cause__ is None  # no chained exception carrying it either


def test_a_bad_payment_key_given_as_an_override_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_PAYMENT_KEYS, key 1"):
        Settings.from_env({}, payment_keys=("whsec_short",))


@pytest.mark.parametrize("raw", ["0", "-1", "86400.5", "86401", "inf", "nan"])
def test_payment_tolerance_out_of_bounds(raw: str) -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_PAYMENT_TOLERANCE"):
        Settings.from_env({"RPC_SERVER_PAYMENT_TOLERANCE": raw})


@pytest.mark.parametrize("raw", ["0.5", "1", "300", "86400"])
def test_payment_tolerance_within_bounds(raw: str) -> None:
    assert Settings.from_env({"RPC_SERVER_PAYMENT_TOLERANCE": raw}).payment_tolerance == float(raw)


def test_payment_tolerance_must_be_a_number() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"RPC_SERVER_PAYMENT_TOLERANCE": "five minutes"})
    assert "RPC_SERVER_PAYMENT_TOLERANCE" in str(raised.value)


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("off", False)])
def test_allow_demo(raw: str, value: bool) -> None:
    assert Settings.from_env({"RPC_SERVER_ALLOW_DEMO": raw}).allow_demo is value
