"""CORS: which browser pages may call the API, by aiohttp_cors, with two rules it lacks.

Where it sits: set up by the app factory when ``RPC_SERVER_CORS_ORIGINS`` is set;
aiohttp_cors answers preflights on every route and adds ``Access-Control-Allow-Origin``
to answers through the ``on_response_prepare`` signal. No credentials (cookies) are
ever allowed: the API takes a bearer token in ``Authorization``.

- An exact list of origins (``scheme://host[:port]``, as a browser writes its
  ``Origin`` header): checked when the settings are read (``origin_problem``), since a
  trailing slash or an upper-case letter would never match any browser.
- ``*``, alone, is the explicit choice of any origin. aiohttp_cors then echoes the
  request's origin, whatever it is, ``null`` included: the opaque origin of sandboxed
  frames, ``data:`` URLs and local files, which any page can take on. Its router adapter
  is the library's extension point; ``NoOpaqueOrigin`` turns ``null`` away there, for
  preflights and answers alike, so no list or ``*`` ever grants it.

Since the grant depends on the request's origin, every answer says ``Vary: Origin``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp_cors
from aiohttp import hdrs, web
from aiohttp_cors.urldispatcher_router_adapter import ResourcesUrlDispatcherRouterAdapter

from rpc_server.http.request_id import HEADER as REQUEST_ID_HEADER

ANY_ORIGIN: Final = "*"
OPAQUE_ORIGIN: Final = "null"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")
_HOST_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_FORM: Final = "write it as a browser sends it, scheme://host or scheme://host:port"


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` can never match a browser's ``Origin`` header, or None if it can."""
    if origin == OPAQUE_ORIGIN:
        return "null (sandboxed frames, data: URLs, local files) is never allowed"
    if origin == ANY_ORIGIN:
        return "* allows any origin and must stand alone"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:  # an unbalanced bracket, a port that is not a number
        return _FORM
    host = parts.hostname or ""
    if not _SCHEME.fullmatch(parts.scheme) or parts.username is not None or not _valid_host(host):
        return _FORM
    if ":" in host:
        host = f"[{host}]"
    canonical = f"{parts.scheme}://{host}"
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        canonical += f":{port}"
    if origin != canonical:
        return f"{_FORM}: {canonical}"
    return None


def _valid_host(host: str) -> bool:
    if _HOST_NAME.fullmatch(host):
        return True
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def origins_problem(origins: tuple[str, ...]) -> str | None:
    """Why a list of origins (``RPC_SERVER_CORS_ORIGINS``) is not usable, or None."""
    if origins == (ANY_ORIGIN,):
        return None
    for origin in origins:
        problem = origin_problem(origin)
        if problem is not None:
            return f"{origin!r}: {problem}"
    return None


class NoOpaqueOrigin(ResourcesUrlDispatcherRouterAdapter):
    """aiohttp_cors's router adapter, never granting the ``null`` origin."""

    def is_cors_enabled_on_request(self, request: web.Request) -> bool:
        if request.headers.get(hdrs.ORIGIN) == OPAQUE_ORIGIN:
            return False  # the answer goes out without a grant
        return super().is_cors_enabled_on_request(request)

    async def get_preflight_request_config(
        self, preflight_request: web.Request, origin: str, requested_method: str
    ) -> Mapping[str, Any]:
        if origin == OPAQUE_ORIGIN:
            return {}  # "no origins are allowed": the preflight is refused (403)
        config: Mapping[str, Any] = await super().get_preflight_request_config(
            preflight_request, origin, requested_method
        )
        return config


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.add(hdrs.VARY, hdrs.ORIGIN)


def allow_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Let browser pages on ``origins`` (or any, for ``("*",)``) call every route."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # untyped library
        allow_credentials=False,
        allow_headers=("Authorization", "Content-Type", REQUEST_ID_HEADER),
        expose_headers=(REQUEST_ID_HEADER,),
        max_age=600,
    )
    defaults = {origin: options for origin in origins}
    cors = aiohttp_cors.CorsConfig(
        app, defaults=defaults, router_adapter=NoOpaqueOrigin(app.router, defaults)
    )
    for route in list(app.router.routes()):
        cors.add(route)
    app.on_response_prepare.append(_vary_on_origin)
