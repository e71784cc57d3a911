"""The caller's credentials, read from the request's ``Authorization`` header(s).

Read once per HTTP request, before the envelope: the token goes into the call context
(``rpc_server.jsonrpc.context``), which looks it up at most once. Two or more ``Authorization``
headers are ambiguous: proxies and frameworks disagree about which one counts, so none
does, and every call in the request answers 401 (``RpcContext.authenticate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import MultiMapping


@dataclass(frozen=True, slots=True)
class Credentials:
    token: str | None = None
    # More than one Authorization header: nothing in the request is authenticated.
    ambiguous: bool = False


def bearer_token(value: str) -> str | None:
    """The token of one ``Authorization`` header value, or None if it holds no bearer token."""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    # Tokens are ASCII; anything else (even undecodable bytes) is simply not a token.
    if scheme.lower() != "bearer" or not token or not token.isascii():
        return None
    return token


def read_credentials(headers: MultiMapping[str]) -> Credentials:
    """The request's credentials; ``ambiguous`` when it has several Authorization headers."""
    values = headers.getall("Authorization", [])
    if len(values) > 1:
        return Credentials(ambiguous=True)
    return Credentials(bearer_token(values[0]) if values else None)
