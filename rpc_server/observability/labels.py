"""Label values shared by the metrics and the traces, importable without either library.

``prometheus_client`` must not be imported before ``serve --workers N`` has set its
multiprocess directory (``rpc_server.observability.metrics``), so what the request path
needs at import time lives here.
"""

from __future__ import annotations

# A method name no method is registered under, as OpenTelemetry's conventions name it.
OTHER_METHOD = "_OTHER"
# A call's outcome when it succeeded (otherwise the error code, as a string).
OK = "ok"

# prometheus-client's multiprocess mode: the directory its values are written to (its
# documented variable, read once when it is imported).
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
