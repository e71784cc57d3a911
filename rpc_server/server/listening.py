"""The addresses ``serve`` listens on: asked about before anything starts, then bound.

Binding fails later, inside the server (or in a worker, with the app already half
started); asked here first (``listen_problem``), a port in use is one line on stderr.
The sockets are bound as asyncio's ``create_server`` binds them (every address the host
name resolves to, ``SO_REUSEADDR``, IPv6 sockets IPv6 only). One process listens on
``bind_listeners``; several (gunicorn, ``rpc_server.server.worker_pool``) are told the same
addresses (``listen_addresses``) and gunicorn's arbiter binds them.
"""

from __future__ import annotations

import socket
from typing import Any

# The listening socket's accept queue (aiohttp's TCPSite default), per listening socket.
BACKLOG = 128

Address = tuple[socket.AddressFamily, tuple[Any, ...]]


def listen_addresses(host: str, port: int) -> list[Address]:
    """The (family, socket address) pairs to listen on; raises ``socket.gaierror``."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # dict: each address once, in the resolver's order (as asyncio's create_server does).
    return list(dict.fromkeys((family, address) for family, _, _, _, address in found))


def bind_listeners(host: str, port: int, *, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address of ``host:port``; raises OSError
    (``socket.gaierror`` for a host that does not resolve), with none left open."""
    sockets: list[socket.socket] = []
    try:
        for family, address in listen_addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (the system's words); None if it can."""
    try:
        for sock in bind_listeners(host, port):
            sock.close()
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None
