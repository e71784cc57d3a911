"""examples/grafana/rpc-server-dashboard.json queries only series the server exports.

Every metric name in every panel's PromQL must be a sample name a real ``GET /metrics``
can carry (a counter's ``_total``, a histogram's ``_bucket``/``_count``/``_sum``, a gauge's
own name), read with prometheus-client's own parser from a server that has answered calls.
A renamed series breaks this test before it breaks an operator's dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "rpc-server-dashboard.json"
# A series name in PromQL: rpc_server_… (label names and functions never start so).
SERIES = re.compile(r"\brpc_server_[a-z0-9_]+")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


def queries(dashboard: dict[str, Any]) -> list[str]:
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if isinstance(variable.get("query"), dict)
    ]
    return expressions


async def exported_series(client: TestClient[Any, Any]) -> set[str]:
    await client.post("/rpc", json={"jsonrpc": "2.0", "method": "course.list", "id": 1})
    response = await client.get("/metrics")
    assert response.status == 200
    names: set[str] = set()
    for family in text_string_to_metric_families(await response.text()):
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
    return names


async def test_every_series_the_dashboard_queries_is_exported(
    client: TestClient[Any, Any],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = {name for expression in queries(dashboard) for name in SERIES.findall(expression)}
    assert len(wanted) >= 10  # the dashboard does query the server's series
    exported = await exported_series(client)
    assert wanted - exported == set()


async def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            # Rates over counters only: a rate of a gauge is a mistake PromQL accepts.
            for function_call in re.findall(r"rate\(([a-z0-9_]+)", target["expr"]):
                assert function_call.endswith(("_total", "_bucket")), target["expr"]
