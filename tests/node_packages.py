"""Node.js for the tests that need it: the Node example and the reference OpenRPC validator.

All come from examples/package.json (jayson and ws for the example, the validator for the
tests), pinned by examples/package-lock.json (``.ci/run`` installs them with ``npm ci``).
Without ``node`` such a test is skipped on a developer's machine and fails in CI (``CI``
set), so CI can never pass without having run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# What examples/package.json installs, as the files that show it is installed.
PACKAGES = ("jayson", "ws", "@open-rpc/schema-utils-js")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_node(purpose: str) -> str:
    """The path of ``node``; skip (fail in CI) when it is missing."""
    node = shutil.which("node")
    if node is None:
        reason = f"node is not installed: {purpose} needs it"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return node


def install_node_dependencies() -> None:
    """``npm ci`` in examples/ unless every package is installed already (CI does it first)."""
    if all((EXAMPLES / "node_modules" / name / "package.json").is_file() for name in PACKAGES):
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is installed but npm is not: install npm to run the Node.js tests")
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
