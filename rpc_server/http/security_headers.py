"""Headers every answer carries, set through aiohttp's ``on_response_prepare`` signal.

Where it sits: the signal runs as each response is prepared, after the handler and the
middlewares, for every answer the application gives: ``/rpc``, health, docs, the
refusals of ``rpc_server.http.errors`` and CORS preflights alike.

- ``X-Content-Type-Options: nosniff``: a browser never reads an answer as anything but
  its declared type (JSON stays JSON, even when it quotes what a client sent).
- ``Referrer-Policy: no-referrer``: links on the docs page leak no address.
- ``Content-Security-Policy: default-src 'none'; frame-ancestors 'none'`` unless the
  handler set its own (``/docs`` does, allowing exactly its inline stylesheet): a JSON
  answer opened in a browser loads nothing, runs nothing and cannot be framed.
- ``Server: rpc-server``: no product versions for a scanner to match (aiohttp would
  write ``Python/3.x aiohttp/3.y``; it only sets the header when nobody has).

Answers that aiohttp's HTTP parser gives itself, before the application sees a
request, do not pass through here (see ``rpc_server.http.errors``).
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web

SERVER: Final = "rpc-server"
DEFAULT_POLICY: Final = "default-src 'none'; frame-ancestors 'none'"
_ALWAYS: Final = (
    (hdrs.SERVER, SERVER),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    for name, value in _ALWAYS:
        headers[name] = value
    headers.setdefault(hdrs.CONTENT_SECURITY_POLICY, DEFAULT_POLICY)
