"""rpc.discover."""

from schemas.base import Params


class DiscoverParams(Params):
    """rpc.discover takes no params."""
