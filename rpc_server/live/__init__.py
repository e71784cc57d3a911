"""Live purchase updates: JSON-RPC 2.0 over a WebSocket on ``GET /rpc``, with subscriptions.

The flow::

    commit of a state change (purchase_events row, seq N)
      -> PostgreSQL: the row's trigger runs NOTIFY purchase_events 'N' (migration 0007);
         each process's ``listener`` wakes its ``feed``
      -> SQLite (one process): the unit of work wakes the feed after its commit
      -> ``feed``: reads the events after the last one it saw, by sequence, and hands
         each to the subscriptions it concerns (``subscriptions``)
      -> ``connection``: renders the notification (``messages``) into the socket's
         bounded send queue; a socket that falls behind is closed
    GET /rpc (Upgrade: websocket) -> ``transport``: authenticates, answers each text
    frame as the HTTP endpoint answers a body, and starts a subscription's replay once
    the answer that names it is queued.
"""
