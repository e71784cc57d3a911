"""JSON-RPC 2.0: the envelope, dispatch over the method registry, error codes, rate
limits, the OpenRPC document."""
