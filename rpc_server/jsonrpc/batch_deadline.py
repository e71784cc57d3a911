"""A batch's deadline: the whole batch is answered within ``RPC_SERVER_BATCH_TIMEOUT``.

``handle_rpc`` (``rpc_server.app``) starts one for each batch and puts it in the batch's
``RpcContext``; each call runs until the sooner of its own timeout
(``RPC_SERVER_CALL_TIMEOUT``) and the batch's deadline, kept by the lane that runs it
(``rpc_server.jsonrpc.envelope.answer``). A call the deadline cuts answers -32001 "Timed
out" with ``{"batch_timeout_seconds": N}`` and its unit of work rolls back, as a call cut
by its own timeout does; an item that had not started by then answers the same without
running. Items already answered keep their answers. Without it, a batch of 100 slow calls
run 10 at a time could hold its connection for ten call timeouts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from jsonrpcserver import Error
from jsonrpcserver.result import Result

from rpc_server.jsonrpc.errors import TIMED_OUT


@dataclass(frozen=True)
class BatchDeadline:
    """When a batch's calls must be done (``loop.time()``), and the timeout it came from."""

    at: float
    seconds: float

    @classmethod
    def from_now(cls, seconds: float) -> BatchDeadline:
        return cls(asyncio.get_running_loop().time() + seconds, seconds)

    def passed(self) -> bool:
        return asyncio.get_running_loop().time() >= self.at

    def timed_out(self) -> Result:
        """The answer of a call the batch's deadline cut (or never let start)."""
        return Error(TIMED_OUT, "Timed out", {"batch_timeout_seconds": self.seconds})
