"""A misspelt RPC_SERVER_* variable is named at start, with the setting it resembles."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_cli import run, workdir

__all__ = ["workdir"]  # the fixture, used by name


def test_a_misspelt_variable_is_named_and_the_command_still_runs(workdir: Path) -> None:
    result = run("migrate", cwd=workdir, env={"RPC_SERVER_DATABSE_URL": "postgresql+asyncpg://x/y"})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: unknown variable RPC_SERVER_DATABSE_URL (did you mean RPC_SERVER_DATABASE_URL?)"
    ]
    assert (workdir / "rpc_server.sqlite3").exists()  # the default database, as the typo says


def test_known_variables_give_no_warning(workdir: Path) -> None:
    result = run("migrate", cwd=workdir, env={"RPC_SERVER_LOG_LEVEL": "WARNING"})
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr
