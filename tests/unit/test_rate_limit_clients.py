"""Who the client is (peer, trusted proxies' X-Forwarded-For, IPv6 per /64), what its
credentials are (one Authorization header or none), and how often its failures are logged."""

from __future__ import annotations

import ipaddress
import logging
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from rpc_server.http.client_address import (
    LABELS_REMEMBERED,
    ClientAddresses,
    client_label,
    parse_address,
)
from rpc_server.jsonrpc.credentials import Credentials, read_credentials
from rpc_server.log_throttle import ThrottledLog


def label(addresses: ClientAddresses, peer: str | None, *forwarded_for: str) -> str:
    return client_label(addresses.client(peer, forwarded_for))


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack socket
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("[2001:db8::1", None),
        ("999.1.1.1", None),
    ],
)
def test_addresses_are_read_as_proxies_write_them(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == address


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    nobody = ClientAddresses()
    assert label(nobody, "203.0.113.7", "198.51.100.1") == "203.0.113.7"
    assert label(nobody, "127.0.0.1", "198.51.100.1") == "127.0.0.1"
    assert label(nobody, None) == "unknown"


def test_the_header_is_believed_only_from_a_trusted_peer() -> None:
    proxies = ClientAddresses(["10.0.0.0/8"])
    assert label(proxies, "10.1.2.3", "198.51.100.1") == "198.51.100.1"
    assert label(proxies, "203.0.113.7", "198.51.100.1") == "203.0.113.7"  # not a proxy
    assert label(proxies, "10.1.2.3") == "10.1.2.3"  # a trusted peer without a header


def test_the_right_most_untrusted_entry_is_the_client() -> None:
    proxies = ClientAddresses(["10.0.0.0/8", "192.0.2.1"])
    # The client wrote "1.1.1.1" itself; the edge proxy appended what it saw.
    assert label(proxies, "10.0.0.5", "1.1.1.1, 198.51.100.1") == "198.51.100.1"
    # Two proxies in a row: the one in front of us and the edge.
    assert label(proxies, "10.0.0.5", "1.1.1.1, 198.51.100.1, 192.0.2.1") == "198.51.100.1"
    # Several headers count as one list, in order.
    assert label(proxies, "10.0.0.5", "1.1.1.1", "198.51.100.1, 10.9.9.9") == "198.51.100.1"


def test_junk_in_the_header_cannot_make_up_a_client() -> None:
    proxies = ClientAddresses(["10.0.0.0/8"])
    # Junk where the trusted hop's entry should be: that hop is the client, so made-up
    # entries share one bucket instead of each getting a fresh one.
    assert label(proxies, "10.0.0.5", "198.51.100.1, bogus") == "10.0.0.5"
    assert label(proxies, "10.0.0.5", "198.51.100.1, bogus, 10.0.0.7") == "10.0.0.7"
    assert label(proxies, "10.0.0.5", "") == "10.0.0.5"


def test_when_every_entry_is_trusted_the_left_most_is_the_client() -> None:
    proxies = ClientAddresses(["10.0.0.0/8"])
    assert label(proxies, "10.0.0.5", "10.0.0.9, 10.0.0.7") == "10.0.0.9"


def test_an_ipv6_client_is_counted_per_64_network() -> None:
    nobody = ClientAddresses()
    assert label(nobody, "2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert label(nobody, "2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert label(nobody, "2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert label(nobody, "::1") == "::/64"
    proxies = ClientAddresses(["::1"])
    assert label(proxies, "::1", "2001:db8:1:2::42") == "2001:db8:1:2::/64"


def test_a_label_fits_a_bucket_key() -> None:
    widest = ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    assert len("ip:" + client_label(widest)) <= 64  # rate_limit_buckets.key is 64 wide


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_one_authorization_header_gives_its_bearer_token() -> None:
    assert read_credentials(headers(("Authorization", "Bearer rpcs_x"))) == Credentials("rpcs_x")
    assert read_credentials(headers(("authorization", "bearer  rpcs_x "))) == Credentials("rpcs_x")
    assert read_credentials(headers(("Authorization", "Basic YTpi"))) == Credentials()
    assert read_credentials(headers(("Authorization", "Bearer ünïcode"))) == Credentials()
    assert read_credentials(headers()) == Credentials()


@pytest.mark.parametrize(
    "values",
    [
        ("Bearer rpcs_a", "Bearer rpcs_b"),
        ("Bearer rpcs_a", "Bearer rpcs_a"),  # even the same token twice
        ("Bearer rpcs_a", "Basic YTpi"),
        ("", "Bearer rpcs_a"),
    ],
)
def test_two_authorization_headers_are_ambiguous(values: tuple[str, str]) -> None:
    credentials = read_credentials(headers(*(("Authorization", v) for v in values)))
    assert credentials == Credentials(token=None, ambiguous=True)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_throttled_log_writes_one_line_per_key_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks = Ticks()
    logger = logging.getLogger("tests.throttled")
    throttled = ThrottledLog(logger, logging.INFO, interval=60.0, clock=ticks)
    with caplog.at_level(logging.INFO, logger="tests.throttled"):
        assert throttled.log("203.0.113.7", "failed from %s", "203.0.113.7")
        for _ in range(99):
            assert not throttled.log("203.0.113.7", "failed from %s", "203.0.113.7")
        assert throttled.log("198.51.100.1", "failed from %s", "198.51.100.1")
        ticks.now = 60.0
        assert throttled.log("203.0.113.7", "failed from %s", "203.0.113.7")
    assert [r.getMessage() for r in caplog.records] == [
        "failed from 203.0.113.7",
        "failed from 198.51.100.1",
        "failed from 203.0.113.7 (and 99 more like it since the last such line)",
    ]
    assert {r.levelname for r in caplog.records} == {"INFO"}


def test_a_throttled_log_forgets_the_least_recently_used_keys() -> None:
    ticks = Ticks()
    throttled = ThrottledLog(
        logging.getLogger("tests.throttled"), logging.DEBUG, max_keys=2, clock=ticks
    )
    for key in ("a", "b", "c"):
        assert throttled.log(key, "x")
    assert throttled.log("a", "x")  # forgotten: written again
    assert not throttled.log("c", "x")


def request_from(peer: str, *forwarded_for: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 51234) if name == "peername" else default
    )
    headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded_for)
    return make_mocked_request("POST", "/rpc", headers=headers, transport=transport)


def test_a_request_is_labelled_as_its_client_whatever_the_peers_seen_before() -> None:
    """Without trusted proxies a peer's label is remembered; the memory is bounded and
    never changes an answer."""
    nobody = ClientAddresses()
    peers = [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(LABELS_REMEMBERED + 10)]
    for peer in [*peers, *peers[:20], "2001:db8::1", "::ffff:203.0.113.7"]:
        assert nobody.label_of(request_from(peer, "198.51.100.1")) == label(nobody, peer)
    assert nobody.label_of(request_from("2001:db8::1")) == "2001:db8::/64"
    # Behind a trusted proxy the header still counts, request by request.
    proxies = ClientAddresses(["10.0.0.0/8"])
    assert proxies.label_of(request_from("10.1.2.3", "198.51.100.1")) == "198.51.100.1"
    assert proxies.label_of(request_from("10.1.2.3", "198.51.100.2")) == "198.51.100.2"
