"""The domain layer: records, the fulfillment state machine, services and their errors.

Nothing here imports HTTP, JSON-RPC or SQL. Services talk to storage through the
``UnitOfWork`` protocol in ``rpc_server.domain.ports``; tests drive them with fakes.
"""
