"""A test limited to PostgreSQL, on a run without one, is skipped saying what it needs.

Run as its own pytest process without ``RPC_SERVER_TEST_DATABASE_URL``, on a test file
whose test is marked ``@pytest.mark.backends("postgresql")``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.databases import TEST_DATABASE_URL_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
POSTGRESQL_ONLY = "tests/integration/test_keyset_paging.py"


def test_a_postgresql_only_test_skips_saying_it_needs_the_test_database_url() -> None:
    env = {k: v for k, v in os.environ.items() if k != TEST_DATABASE_URL_VARIABLE}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", POSTGRESQL_ONLY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout, run.stdout
    assert f"needs PostgreSQL: set {TEST_DATABASE_URL_VARIABLE}" in run.stdout, run.stdout
    assert "empty parameter set" not in run.stdout
