"""A JSON-RPC 2.0 server for purchase fulfillment."""

__version__ = "0.1.0"
