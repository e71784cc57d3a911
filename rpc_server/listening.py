"""Whether ``serve`` can listen on its address, asked before anything starts.

Binding fails later, inside the server (or in each worker, which its supervisor would
restart forever), with the app already half started; asked here first, a port in use is
one line on stderr. The sockets are bound as asyncio's ``create_server`` binds them
(``SO_REUSEADDR``, IPv6 sockets IPv6 only), then closed.
"""

from __future__ import annotations

import socket


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (the system's words); None if it can."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return (exc.strerror or str(exc)).lower()
    return None
