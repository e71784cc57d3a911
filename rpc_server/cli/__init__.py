"""The ``rpc-server`` command line (``rpc_server.cli.main``)."""

from rpc_server.cli.main import main

__all__ = ["main"]
