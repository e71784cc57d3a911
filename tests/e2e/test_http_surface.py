"""The HTTP around JSON-RPC: request ids, content type, verbs, health and readiness, CORS,
the log line an internal error leaves behind, every refusal as a JSON-RPC error (and what
aiohttp's parser answers itself, over a raw socket), and the security headers.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import REGISTRY
from schemas.base import Out, Params
from tests.conftest import World
from tests.e2e.conftest import AppClientFactory, notification_object, request_object

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
REQUEST_ID = "X-Request-ID"
ACCEPTABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SHOP = "https://shop.example"
EVIL = "https://evil.example"


def request_id_of(response: ClientResponse) -> str:
    """The response's X-Request-ID, which every response carries and which is well-formed."""
    request_id = response.headers.get(REQUEST_ID)
    assert request_id is not None, (response.status, dict(response.headers))
    assert ACCEPTABLE_REQUEST_ID.fullmatch(request_id), request_id
    return request_id


async def post_rpc(client: TestClient[Any, Any], body: Any, **headers: str) -> ClientResponse:
    response = await client.post("/rpc", json=body, headers=headers)
    await response.read()
    return response


# --- X-Request-ID -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "offered",
    [
        "abc",
        "0",
        "a" * 128,
        "A-Z.a_z:0-9",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "trace:2024-01-01T00:00:00.000",
    ],
)
async def test_valid_request_id_is_echoed(
    client: TestClient[Any, Any], world: World, offered: str
) -> None:
    response = await post_rpc(client, request_object("course.list"), **{REQUEST_ID: offered})
    assert response.status == 200
    assert request_id_of(response) == offered


@pytest.mark.parametrize(
    "offered",
    [
        pytest.param("a" * 129, id="too-long"),
        pytest.param("has space", id="space"),
        pytest.param("caf\u00e9", id="non-ascii"),
        pytest.param("\u4e2d\u6587", id="cjk"),
        pytest.param("a/b", id="slash"),
        pytest.param("a;b=c", id="semicolon"),
        pytest.param('"quoted"', id="quotes"),
        pytest.param("<script>", id="angle-brackets"),
        pytest.param("", id="empty"),
    ],
)
async def test_invalid_request_id_is_replaced_by_a_new_one(
    client: TestClient[Any, Any], world: World, offered: str
) -> None:
    seen = set()
    for _ in range(3):
        response = await post_rpc(client, request_object("course.list"), **{REQUEST_ID: offered})
        assert response.status == 200
        request_id = request_id_of(response)
        assert request_id != offered
        seen.add(request_id)
    assert len(seen) == 3  # a fresh id for each request


async def test_request_id_is_generated_and_distinct_when_absent(
    client: TestClient[Any, Any], world: World
) -> None:
    ids = []
    for _ in range(5):
        response = await post_rpc(client, request_object("course.list"))
        ids.append(request_id_of(response))
        response = await client.get("/healthz")
        ids.append(request_id_of(response))
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("offered", [None, "given-id-1"])
async def test_every_kind_of_response_carries_a_request_id(
    app_client: AppClientFactory, settings: Settings, world: World, offered: str | None
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_body_bytes=1024))
    headers = {REQUEST_ID: offered} if offered else {}
    responses = {
        "200": await client.post("/rpc", json=request_object("course.list"), headers=headers),
        "200-parse-error": await client.post("/rpc", data=b"{", headers=headers),
        "204": await client.post("/rpc", json=notification_object("foobar"), headers=headers),
        "405": await client.get("/rpc", headers=headers),
        "413": await client.post("/rpc", data=io.BytesIO(b" " * 2000), headers=headers),
        "404": await client.get("/no-such-route", headers=headers),
        "healthz": await client.get("/healthz", headers=headers),
        "readyz": await client.get("/readyz", headers=headers),
    }
    expected_status = {"204": 204, "405": 405, "413": 413, "404": 404}
    ids = []
    for name, response in responses.items():
        await response.read()
        assert response.status == expected_status.get(name, 200), name
        request_id = request_id_of(response)
        if offered:
            assert request_id == offered, name
        ids.append(request_id)
    if not offered:
        assert len(set(ids)) == len(ids)


# --- content type and verbs -------------------------------------------------------------


async def test_json_responses_say_utf8_json(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_body_bytes=1024))
    for response in (
        await client.post("/rpc", json=request_object("course.list")),
        await client.post("/rpc", json=[request_object("course.list")]),
        await client.post("/rpc", data=b"not json"),
        await client.post("/rpc", data=io.BytesIO(b" " * 2000)),
        await client.get("/healthz"),
        await client.get("/readyz"),
    ):
        await response.json()  # parses as JSON
        assert response.headers["Content-Type"] == JSON_CONTENT_TYPE, response.url


async def test_answer_with_non_ascii_text_is_utf8(client: TestClient[Any, Any]) -> None:
    response = await client.post("/rpc", json=request_object("caf\u00e9.\u4e2d", id="\u00e9"))
    raw = await response.read()
    assert response.headers["Content-Type"] == JSON_CONTENT_TYPE
    body = json.loads(raw.decode("utf-8"))  # decodes as the header says
    assert body["id"] == "\u00e9"
    assert body["error"]["code"] == -32601


@pytest.mark.parametrize("verb", ["GET", "HEAD", "PUT", "DELETE"])
@pytest.mark.parametrize("cors", [False, True], ids=["plain", "cors"])
async def test_only_post_is_allowed_on_rpc(
    app_client: AppClientFactory, settings: Settings, verb: str, cors: bool
) -> None:
    origins = (SHOP,) if cors else ()
    client = await app_client(settings=dataclasses.replace(settings, cors_origins=origins))
    response = await client.request(verb, "/rpc", headers={"Origin": SHOP})
    await response.read()
    assert response.status == 405
    assert "POST" in response.headers.get("Allow", "")
    request_id_of(response)


# --- health and readiness ---------------------------------------------------------------


async def test_healthz_and_readyz_when_the_database_answers(
    client: TestClient[Any, Any],
) -> None:
    healthz = await client.get("/healthz")
    assert (healthz.status, await healthz.json()) == (200, {"status": "ok"})
    readyz = await client.get("/readyz")
    assert (readyz.status, await readyz.json()) == (200, {"status": "ready"})


async def test_readyz_is_503_without_internals_when_the_database_is_gone(
    app_client: AppClientFactory, settings: Settings, tmp_path: Path
) -> None:
    missing = tmp_path / "nonexistent-dir" / "x.sqlite3"
    threads_before = set(threading.enumerate())
    client = await app_client(
        settings=dataclasses.replace(settings, database_url=f"sqlite+aiosqlite:///{missing}")
    )
    readyz = await client.get("/readyz")
    text = await readyz.text()
    assert readyz.status == 503
    assert readyz.headers["Content-Type"] == JSON_CONTENT_TYPE
    assert await readyz.json() == {"status": "unavailable"}
    for leak in ("nonexistent-dir", "sqlite", "unable", "Error", "Traceback"):
        assert leak not in text
    request_id_of(readyz)

    # Liveness says nothing about the database: the process still runs.
    healthz = await client.get("/healthz")
    assert (healthz.status, await healthz.json()) == (200, {"status": "ok"})
    await _threads_finished(set(threading.enumerate()) - threads_before)


async def _threads_finished(threads: set[threading.Thread]) -> None:
    """Let aiosqlite's workers of the connections that failed to open stop while the
    event loop still runs (they report back to it)."""
    for _ in range(200):
        if not any(thread.is_alive() for thread in threads):
            return
        await asyncio.sleep(0.01)


# --- CORS -------------------------------------------------------------------------------


@pytest.fixture
async def cors_client(app_client: AppClientFactory, settings: Settings) -> TestClient[Any, Any]:
    return await app_client(settings=dataclasses.replace(settings, cors_origins=(SHOP,)))


def preflight_headers(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    }


def header_list(response: ClientResponse, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item}


async def test_preflight_from_an_allowed_origin_succeeds(
    cors_client: TestClient[Any, Any],
) -> None:
    response = await cors_client.options("/rpc", headers=preflight_headers(SHOP))
    await response.read()
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == SHOP
    allowed = header_list(response, "Access-Control-Allow-Headers")
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in response.headers.get("Access-Control-Allow-Methods", "")
    request_id_of(response)


async def test_preflight_allows_sending_a_request_id_but_no_other_header(
    cors_client: TestClient[Any, Any],
) -> None:
    headers = {**preflight_headers(SHOP), "Access-Control-Request-Headers": "X-Request-ID"}
    response = await cors_client.options("/rpc", headers=headers)
    await response.read()
    assert response.status == 200
    assert "x-request-id" in header_list(response, "Access-Control-Allow-Headers")

    headers["Access-Control-Request-Headers"] = "Authorization, X-Not-Allowed"
    response = await cors_client.options("/rpc", headers=headers)
    await response.read()
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_post_from_an_allowed_origin_may_read_the_answer_and_request_id(
    cors_client: TestClient[Any, Any], world: World
) -> None:
    response = await cors_client.post(
        "/rpc",
        json=request_object("purchase.list"),
        headers={"Origin": SHOP, "Authorization": f"Bearer {world.alice.token}"},
    )
    body = await response.json()
    assert response.status == 200
    assert body["result"]["items"] == []
    assert response.headers["Access-Control-Allow-Origin"] == SHOP
    assert "x-request-id" in header_list(response, "Access-Control-Expose-Headers")
    request_id_of(response)


async def test_every_rpc_answer_to_an_allowed_origin_is_readable(
    app_client: AppClientFactory, settings: Settings
) -> None:
    # A frontend must be able to read errors too: parse errors, 204s and 413s.
    client = await app_client(
        settings=dataclasses.replace(settings, cors_origins=(SHOP,), max_body_bytes=1024)
    )
    origin = {"Origin": SHOP}
    for response in (
        await client.post("/rpc", data=b"{", headers=origin),
        await client.post("/rpc", json=notification_object("foobar"), headers=origin),
        await client.post("/rpc", data=io.BytesIO(b" " * 2000), headers=origin),
        await client.get("/readyz", headers=origin),
    ):
        await response.read()
        assert response.status in (200, 204, 413)
        assert response.headers["Access-Control-Allow-Origin"] == SHOP, response.status
        assert "x-request-id" in header_list(response, "Access-Control-Expose-Headers")
        request_id_of(response)


async def test_other_origins_get_no_cors_grant(
    cors_client: TestClient[Any, Any], world: World
) -> None:
    for origin in (EVIL, "https://shop.example.evil.example", "http://shop.example"):
        preflight = await cors_client.options("/rpc", headers=preflight_headers(origin))
        await preflight.read()
        assert preflight.status == 403, origin
        assert "Access-Control-Allow-Origin" not in preflight.headers
        request_id_of(preflight)

        # The server still answers (CORS is enforced by browsers), without a grant.
        response = await cors_client.post(
            "/rpc", json=request_object("course.list"), headers={"Origin": origin}
        )
        await response.json()
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_preflight_for_a_method_other_than_post_is_refused(
    cors_client: TestClient[Any, Any],
) -> None:
    response = await cors_client.options("/rpc", headers=preflight_headers(SHOP, "DELETE"))
    await response.read()
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_without_cors_origins_nobody_gets_a_grant(client: TestClient[Any, Any]) -> None:
    preflight = await client.options("/rpc", headers=preflight_headers(SHOP))
    await preflight.read()
    assert preflight.status >= 400
    assert preflight.status < 500
    assert "Access-Control-Allow-Origin" not in preflight.headers

    response = await client.post(
        "/rpc", json=request_object("course.list"), headers={"Origin": SHOP}
    )
    await response.read()
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


# --- an internal error's log line -------------------------------------------------------


class NoParams(Params):
    """Takes no params."""


async def explode(ctx: RpcContext, actor: Actor | None) -> Any:
    """Always fails."""
    raise RuntimeError("boom")


EXPLODING_REGISTRY = MethodRegistry(
    [
        *REGISTRY.methods.values(),
        RpcMethod("test.explode", explode, NoParams, Out(), auth=False),
    ]
)


@pytest.fixture
async def exploding_client(app_client: AppClientFactory) -> TestClient[Any, Any]:
    return await app_client(registry=EXPLODING_REGISTRY)


def log_lines_with(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if needle in record.getMessage()]


@pytest.mark.parametrize("offered", [None, "frontend-trace.42"])
async def test_internal_error_is_logged_with_error_id_and_request_id(
    exploding_client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, offered: str | None
) -> None:
    headers = {REQUEST_ID: offered} if offered else {}
    with caplog.at_level(logging.ERROR):
        response = await post_rpc(exploding_client, request_object("test.explode"), **headers)
    body = await response.json()
    assert body["error"]["code"] == -32603
    assert body["error"]["data"].keys() == {"error_id"}
    error_id = body["error"]["data"]["error_id"]
    request_id = request_id_of(response)
    if offered:
        assert request_id == offered

    [line] = log_lines_with(caplog, error_id)
    assert request_id in line


async def test_each_failing_batch_item_logs_its_error_id_with_the_shared_request_id(
    exploding_client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    batch = [request_object("test.explode", id=i) for i in range(3)]
    batch.append(notification_object("test.explode"))
    with caplog.at_level(logging.ERROR):
        response = await post_rpc(exploding_client, batch, **{REQUEST_ID: "batch-7"})
    answers = await response.json()
    error_ids = {answer["error"]["data"]["error_id"] for answer in answers}
    assert len(error_ids) == 3
    for error_id in error_ids:
        [line] = log_lines_with(caplog, error_id)
        assert "batch-7" in line
    # The notification failed too: logged under the same request id, not answered.
    assert len(log_lines_with(caplog, "batch-7")) == 4


# --- every refusal a JSON-RPC error, never echoing the request ---------------------------

SECRET = "S3CR3T-marker"


def assert_refusal(status: int, headers: Any, text: str, expected_status: int) -> dict[str, Any]:
    """An HTTP refusal: the status, JSON, a JSON-RPC error with id null, nothing echoed."""
    assert status == expected_status, text[:300]
    assert headers["Content-Type"] == JSON_CONTENT_TYPE
    assert SECRET not in text
    body = json.loads(text)
    assert body.keys() == {"jsonrpc", "error", "id"}
    assert (body["jsonrpc"], body["id"]) == ("2.0", None)
    assert isinstance(body["error"]["code"], int)
    assert body["error"]["message"]
    assert isinstance(body["error"]["data"], str | dict)
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    "verb,path,status,code",
    [
        ("GET", f"/no-such-path/{SECRET}", 404, -32600),
        ("POST", f"/rpc/{SECRET}", 404, -32600),
        ("GET", "/rpc", 405, -32600),
        ("PUT", "/rpc", 405, -32600),
        ("DELETE", "/healthz", 405, -32600),
        ("POST", "/docs", 405, -32600),
        ("GET", "/webhooks/payments", 405, -32600),
    ],
)
async def test_unknown_paths_and_verbs_are_json_rpc_errors(
    client: TestClient[Any, Any], verb: str, path: str, status: int, code: int
) -> None:
    response = await client.request(
        verb, path, headers={"Authorization": f"Bearer {SECRET}", "X-Extra": SECRET}
    )
    error = assert_refusal(response.status, response.headers, await response.text(), status)
    assert error["code"] == code
    if status == 405:
        # Which verb to use (GET on /rpc: its WebSocket upgrade).
        assert response.headers["Allow"] in ("POST", "GET,POST", "GET,HEAD")
    request_id_of(response)


async def test_a_refused_cors_preflight_is_a_json_rpc_error_naming_no_origin(
    cors_client: TestClient[Any, Any],
) -> None:
    for headers in (
        preflight_headers(f"https://{SECRET}.example"),
        {**preflight_headers(SHOP), "Access-Control-Request-Headers": f"X-{SECRET}"},
        {**preflight_headers(SHOP), "Access-Control-Request-Method": SECRET},
    ):
        response = await cors_client.options("/rpc", headers=headers)
        assert_refusal(response.status, response.headers, await response.text(), 403)
        assert "Access-Control-Allow-Origin" not in response.headers


async def explode_route(request: Any) -> Any:
    raise RuntimeError(f"boom {SECRET}")


async def test_an_unexpected_exception_in_a_handler_is_a_json_500_with_an_error_id(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)
    app.router.add_get("/test/explode", explode_route)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR):
        response = await client.get("/test/explode", headers={REQUEST_ID: "explode-1"})
        text = await response.text()
    error = assert_refusal(response.status, response.headers, text, 500)
    assert error["code"] == -32603
    assert "boom" not in text and "Traceback" not in text
    assert error["data"].keys() == {"error_id"}
    error_id = error["data"]["error_id"]
    [line] = log_lines_with(caplog, error_id)
    assert "explode-1" in line
    assert "/test/explode" in line


# --- malformed HTTP, over a raw socket -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool | None  # the server closed the connection after answering (if asked)


async def raw_exchange(
    client: TestClient[Any, Any], request: bytes, *, wait_for_close: bool = False
) -> RawAnswer:
    """Write ``request`` as it is to the test server; read one HTTP/1.x answer, and with
    ``wait_for_close`` whether the server then closes the connection."""
    assert client.server.host is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            closed = await reader.read(1) == b"" if wait_for_close else None
        return RawAnswer(int(status_line.split()[1]), headers, body, closed)
    finally:
        writer.close()
        await writer.wait_closed()


def raw_post(body: bytes, *headers: str) -> bytes:
    head = ["POST /rpc HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", f"x-{SECRET}"])
async def test_an_encoding_aiohttp_would_refuse_in_text_is_our_415(
    client: TestClient[Any, Any], world: World, encoding: str
) -> None:
    """aiohttp's parser would answer br and zstd itself (400, text/plain, naming a library
    to install); here every coding we do not read is the app's 415."""
    answer = await raw_exchange(
        client,
        raw_post(
            json.dumps(request_object("course.list")).encode(), f"Content-Encoding: {encoding}"
        ),
    )
    assert answer.status == 415
    assert answer.headers["content-type"] == JSON_CONTENT_TYPE
    assert answer.headers["accept-encoding"] == "gzip, deflate"
    assert SECRET.encode() not in answer.body
    assert json.loads(answer.body)["error"]["code"] == -32600


async def test_a_gzip_body_with_its_content_length_over_a_raw_socket(
    client: TestClient[Any, Any], world: World
) -> None:
    body = gzip.compress(b" " * 900 + json.dumps(request_object("course.list", id=5)).encode())
    answer = await raw_exchange(client, raw_post(body, "Content-Encoding: gzip"))
    assert answer.status == 200
    assert json.loads(answer.body)["id"] == 5


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /rpc HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            + SECRET.encode() * 1000
            + b"\r\nContent-Length: 2\r\n\r\n{}",
            id="10kb-authorization",
        ),
        pytest.param(
            b"GET /" + SECRET.encode() * 1000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", id="long-path"
        ),
        pytest.param(
            b"POST /rpc HTTP/1.1\r\nHost: t\r\nBad Header " + SECRET.encode() + b"\r\n\r\n",
            id="bad-header",
        ),
    ],
)
async def test_what_aiohttp_s_parser_refuses_never_reaches_the_app(
    client: TestClient[Any, Any], world: World, request_bytes: bytes
) -> None:
    """Pins the limit the README states: a request aiohttp's HTTP parser rejects is
    answered by aiohttp itself (400, text/plain, connection closed) before any of our
    code runs, and aiohttp 3.14 offers no public hook on that answer. It may quote up to
    about 100 bytes of the offending line; it never quotes a whole 10 KB header. The
    server goes on serving."""
    answer = await raw_exchange(client, request_bytes, wait_for_close=True)
    assert answer.status == 400
    assert answer.closed
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.body.count(SECRET.encode()) <= 100 // len(SECRET) + 1

    after = await raw_exchange(client, raw_post(json.dumps(request_object("course.list")).encode()))
    assert after.status == 200


# --- security headers ---------------------------------------------------------------------

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


async def test_every_kind_of_answer_carries_the_security_headers(
    aiohttp_client: Any, settings: Settings, world: World
) -> None:
    app = create_app(dataclasses.replace(settings, cors_origins=(SHOP,), max_body_bytes=1024))
    app.router.add_get("/test/explode", explode_route)
    client = await aiohttp_client(app)
    gz = {"Content-Encoding": "gzip"}
    responses = {
        "200": await client.post("/rpc", json=request_object("course.list")),
        "200-parse-error": await client.post("/rpc", data=b"{"),
        "204": await client.post("/rpc", json=notification_object("foobar")),
        "400-bad-gzip": await client.post("/rpc", data=b"not gzip", headers=gz),
        "404": await client.get("/nope"),
        "405": await client.get("/rpc"),
        "413": await client.post("/rpc", data=io.BytesIO(b" " * 2000)),
        "415": await client.post("/rpc", data=b"{}", headers={"Content-Encoding": "br"}),
        "500": await client.get("/test/explode"),
        "preflight": await client.options("/rpc", headers=preflight_headers(SHOP)),
        "preflight-refused": await client.options("/rpc", headers=preflight_headers(EVIL)),
        "healthz": await client.get("/healthz"),
        "readyz": await client.get("/readyz"),
        "openrpc": await client.get("/openrpc.json"),
        "docs": await client.get("/docs"),
        "webhook": await client.post("/webhooks/payments", data=b"{}"),
    }
    for name, response in responses.items():
        await response.read()
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        assert response.headers["Server"] == "rpc-server", name  # no product, no version
        policy = response.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in policy, name
        assert "default-src 'none'" in policy, name


async def test_the_docs_page_has_a_strict_policy_that_allows_exactly_its_stylesheet(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/docs")
    page = await response.text()
    assert response.status == 200
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["Content-Security-Policy"].split(";")
    }
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    assert "script-src" not in policy  # no scripts at all (default-src 'none')
    [stylesheet] = re.findall(r"<style>(.*?)</style>", page, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(stylesheet.encode()).digest()).decode()
    assert policy["style-src"] == [f"'sha256-{digest}'"]
    for inline in ("<script", " style=", "<link", "<img", "<iframe", " onload=", " onclick="):
        assert inline not in page.lower().replace("<style>", ""), inline


# --- CORS: "*" is any origin, never null; lists are exact -----------------------------------


@pytest.fixture
async def any_origin_client(
    app_client: AppClientFactory, settings: Settings
) -> TestClient[Any, Any]:
    return await app_client(settings=dataclasses.replace(settings, cors_origins=("*",)))


@pytest.mark.parametrize("origin", [SHOP, EVIL, "http://localhost:5173", "http://[::1]:8080"])
async def test_star_lets_any_origin_call_without_credentials(
    any_origin_client: TestClient[Any, Any], world: World, origin: str
) -> None:
    preflight = await any_origin_client.options("/rpc", headers=preflight_headers(origin))
    await preflight.read()
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Credentials" not in preflight.headers

    response = await any_origin_client.post(
        "/rpc", json=request_object("course.list"), headers={"Origin": origin}
    )
    assert len((await response.json())["result"]) == 2
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers.getall("Vary")


@pytest.mark.parametrize("origins", [("*",), (SHOP,)], ids=["star", "list"])
async def test_the_null_origin_is_never_granted(
    app_client: AppClientFactory, settings: Settings, world: World, origins: tuple[str, ...]
) -> None:
    """``null`` is the origin of sandboxed frames, data: URLs and local files: any page can
    take it on, so granting it would grant everyone, reading answers included."""
    client = await app_client(settings=dataclasses.replace(settings, cors_origins=origins))
    preflight = await client.options("/rpc", headers=preflight_headers("null"))
    assert_refusal(preflight.status, preflight.headers, await preflight.text(), 403)
    assert "Access-Control-Allow-Origin" not in preflight.headers

    response = await client.post(
        "/rpc",
        json=request_object("purchase.list"),
        headers={"Origin": "null", "Authorization": f"Bearer {world.alice.token}"},
    )
    assert (await response.json())["result"]["items"] == []  # answered, but not readable
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_answers_vary_on_origin_when_cors_is_on(cors_client: TestClient[Any, Any]) -> None:
    for headers in ({"Origin": SHOP}, {"Origin": EVIL}, {}):
        response = await cors_client.get("/healthz", headers=headers)
        await response.read()
        assert "Origin" in response.headers.getall("Vary", []), headers
