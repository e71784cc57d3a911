"""RPC_SERVER_CORS_ORIGINS: exact origins as browsers send them, or "*" alone, never null."""

from __future__ import annotations

import pytest

from rpc_server.config import ConfigError, Settings


@pytest.mark.parametrize(
    "value,origins",
    [
        ("https://shop.example", ("https://shop.example",)),
        ("http://localhost:3000", ("http://localhost:3000",)),
        (
            "http://127.0.0.1:8000, https://a-b.shop.example",
            ("http://127.0.0.1:8000", "https://a-b.shop.example"),
        ),
        ("http://[::1]:8080", ("http://[::1]:8080",)),
        ("https://shop.example:8443", ("https://shop.example:8443",)),
        ("chrome-extension://abcdefghijklmnop", ("chrome-extension://abcdefghijklmnop",)),
        ("*", ("*",)),
        (" * ", ("*",)),
        ("", ()),
    ],
)
def test_usable_origins(value: str, origins: tuple[str, ...]) -> None:
    settings = Settings.from_env({"RPC_SERVER_CORS_ORIGINS": value})
    assert settings.cors_origins == origins


@pytest.mark.parametrize(
    "value,hint",
    [
        ("null", "never allowed"),
        ("https://shop.example,null", "never allowed"),
        ("*,https://shop.example", "must stand alone"),
        ("https://shop.example,*", "must stand alone"),
        ("https://shop.example/", "https://shop.example"),
        ("https://shop.example/app", "https://shop.example"),
        ("HTTPS://Shop.Example", "https://shop.example"),
        ("https://shop.example:443", "https://shop.example"),
        ("http://shop.example:80", "http://shop.example"),
        ("https://shop.example?x=1", "https://shop.example"),
        ("https://user@shop.example", "scheme://host"),
        ("shop.example", "scheme://host"),
        ("https://*.shop.example", "scheme://host"),
        ("https://shop.example:99999", "scheme://host"),
        ("https://[::1", "scheme://host"),
        ("https://shop_example", "scheme://host"),
        ("https://bücher.example", "scheme://host"),
    ],
)
def test_unusable_origins_are_refused_at_start(value: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_CORS_ORIGINS") as refused:
        Settings.from_env({"RPC_SERVER_CORS_ORIGINS": value})
    assert hint in str(refused.value)
