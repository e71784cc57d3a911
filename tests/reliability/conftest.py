"""The reliability suite: faults, load and hostile input against real server processes.

Every test here is marked ``reliability`` so the suite can be run alone
(``pytest -m reliability``); it also runs as part of the whole suite and in CI.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)
