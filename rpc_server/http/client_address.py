"""Who the client is, by network address: for the limits of callers without a valid token.

Read once per HTTP request, before the envelope; the rate limits (``rpc_server.jsonrpc.rate_limit``)
keep one bucket per client, and failed authentications are logged per client.

The client is the connection's peer, unless the peer is one of
``RPC_SERVER_TRUSTED_PROXIES`` (addresses or networks; none by default). Then the
``X-Forwarded-For`` entries (every such header, in order) are read from the right:
entries that are themselves trusted proxies are skipped, and the first one that is not
is the client. Only trusted hops append to the header, so that entry is the address a
trusted proxy saw; everything left of it was written by the client and is ignored. An
entry that is not an address stops the walk at the trusted hop that passed it on (junk
cannot mint fresh buckets); when every entry is trusted, the left-most is the client.

An IPv6 client is counted per /64 network: one host usually holds a whole /64 and could
otherwise take a fresh address, and a fresh bucket, for every request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDED_FOR = "X-Forwarded-For"
# Clients whose address cannot be read (no peer address) share one bucket.
UNKNOWN = "unknown"
IPV6_CLIENT_PREFIX = 64
# Peers whose label is remembered (without trusted proxies the label depends on the peer
# alone); past this many the memory starts afresh.
LABELS_REMEMBERED = 4096


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``)."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_label(address: IPAddress | None) -> str:
    """The client's name for limits and logs: an IPv4 address, or an IPv6 /64 network."""
    if address is None:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((int(address), IPV6_CLIENT_PREFIX), strict=False)
        return str(network)
    return str(address)


class ClientAddresses:
    """Finds the client of a request, believing ``X-Forwarded-For`` from trusted proxies only."""

    def __init__(self, trusted_proxies: Iterable[str] = ()):
        self.trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(proxy.strip(), strict=False) for proxy in trusted_proxies
        )
        self._labels: dict[str | None, str] = {}

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def client(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> IPAddress | None:
        """The client's address, from the peer and the X-Forwarded-For header values."""
        address = parse_address(peer or "")
        if address is None or not self.trusted or not self.is_trusted(address):
            return address
        entries = [entry for value in forwarded_for for entry in value.split(",")]
        for entry in reversed(entries):
            hop = parse_address(entry)
            if hop is None:
                return address  # junk: the trusted hop that passed it on is the client
            address = hop
            if not self.is_trusted(hop):
                return hop
        return address  # every hop is trusted: the left-most is the client

    def label_of(self, request: web.Request) -> str:
        """The client of ``request``, as ``client_label`` names it."""
        peer = request.remote
        if self.trusted:
            return client_label(self.client(peer, request.headers.getall(FORWARDED_FOR, [])))
        # No proxy is trusted: the peer is the client. Its label is remembered, so that
        # the many requests of one keep-alive connection or client parse it once.
        label = self._labels.get(peer)
        if label is None:
            if len(self._labels) >= LABELS_REMEMBERED:
                self._labels.clear()
            label = self._labels[peer] = client_label(self.client(peer))
        return label
