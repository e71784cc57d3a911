"""The observability settings, and what serve's arbiter must not import before it forks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rpc_server import config
from rpc_server.config import ConfigError, Settings


def test_metrics_are_on_and_tracing_off_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.metrics is True
    assert settings.metrics_token is None
    assert settings.tracing is False


def test_the_observability_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "RPC_SERVER_METRICS": "off",
            "RPC_SERVER_METRICS_TOKEN": "a-scraper-token-of-32-characters",
            "RPC_SERVER_TRACING": "on",
        }
    )
    assert (settings.metrics, settings.tracing) == (False, True)
    assert settings.metrics_token == "a-scraper-token-of-32-characters"


def test_a_short_metrics_token_is_refused_without_being_repeated() -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_METRICS_TOKEN") as raised:
        Settings.from_env({"RPC_SERVER_METRICS_TOKEN": "hunter2"})
    assert "hunter2" not in str(raised.value)


def test_tracing_without_the_otel_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "_tracing_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"RPC_SERVER_TRACING.*rpc-server\[otel\]"):
        Settings.from_env({"RPC_SERVER_TRACING": "on"})
    assert Settings.from_env({"RPC_SERVER_TRACING": "off"}).tracing is False


def test_the_cli_imports_neither_prometheus_client_nor_opentelemetry() -> None:
    """prometheus-client reads PROMETHEUS_MULTIPROC_DIR once, when imported: serve's
    arbiter sets it before forking, so nothing it imports may import the library first
    (and tracing off costs not even OpenTelemetry's import)."""
    code = (
        "import sys, rpc_server.cli, rpc_server.server.worker_pool, rpc_server.app; "
        "print(sorted(m for m in ('prometheus_client', 'opentelemetry') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
