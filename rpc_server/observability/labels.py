"""Label values shared by the metrics and the traces, importable without either library.

``prometheus_client`` must not be imported before ``serve --workers N`` has set its
multiprocess directory (``rpc_server.observability.metrics``), so what the request path
needs at import time lives here.
"""

from __future__ import annotations

# A method name no method is registered under, as OpenTelemetry's conventions name it.
OTHER_METHOD = "_OTHER"


def method_label(method: str, registered: frozenset[str]) -> str:
    """A method's name as metrics and spans show it: itself when registered, else
    ``_OTHER`` (so what a client sends never makes a new label value)."""
    return method if method in registered else OTHER_METHOD


# A call's outcome when it succeeded (otherwise the error code, as a string).
OK = "ok"

# prometheus-client's multiprocess mode: the directory its values are written to (its
# documented variable, read once when it is imported).
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
