"""The OpenRPC document: valid against the published meta-schema (formats checked, as
the reference tooling checks them) and by the reference tooling itself
(@open-rpc/schema-utils-js under node), true to the registry, and true to what the
server actually answers, where it actually answers."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft7Validator, Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT7, DRAFT202012

from rpc_server.config import ConfigError, Settings
from rpc_server.jsonrpc.openrpc import build_document
from rpc_server.methods import REGISTRY
from tests.conftest import RpcCall, World, sqlite_url
from tests.e2e.conftest import AppClientFactory, assert_error
from tests.node_packages import EXAMPLES, install_node_dependencies, require_node
from tests.payments import proof_for
from tests.processes import running_server

DATA = Path(__file__).resolve().parents[1] / "data" / "openrpc"
OPENRPC_META = json.loads((DATA / "open-rpc-meta-schema-1.14.9.json").read_text())
JSON_SCHEMA_META = json.loads((DATA / "json-schema-tools-meta-schema-1.8.0.json").read_text())
# The document an app with the default settings serves (the test settings keep them).
SERVER_URL = "http://127.0.0.1:8080/rpc"
DOCUMENT = build_document(REGISTRY, server_url=SERVER_URL)
# The reasons a 402 carries in data.reason (README, "Errors"), written here on purpose.
PAYMENT_REASONS = ["missing", "invalid_signature", "expired", "mismatch", "reused", "malformed"]

# Every format the meta-schemas and the document use. jsonschema checks a format only
# when asked to (format_checker) and only when the package it needs is installed
# (uri, uri-reference: rfc3986-validator; date-time: rfc3339-validator); an unchecked
# format passes anything, which is how a relative servers[0].url once went unnoticed.
FORMAT_CHECKER = FormatChecker()


def formats_used(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        if isinstance(value.get("format"), str):
            found.add(value["format"])
        for item in value.values():
            found |= formats_used(item)
    elif isinstance(value, list):
        for item in value:
            found |= formats_used(item)
    return found


def no_network(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)


def meta_schema_validator() -> Draft7Validator:
    """The OpenRPC meta-schema, its $ref to the JSON Schema meta-schema resolved locally."""
    tools = Resource.from_contents(JSON_SCHEMA_META, default_specification=DRAFT7)
    registry: Registry[Any] = Registry(retrieve=no_network).with_resources(  # type: ignore[call-arg]
        [("https://meta.json-schema.tools", tools), ("https://meta.json-schema.tools/", tools)]
    )
    return Draft7Validator(OPENRPC_META, registry=registry, format_checker=FORMAT_CHECKER)


def document_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Validate against ``schema``, whose $refs point into the document's components."""
    document = Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry(retrieve=no_network).with_resource(  # type: ignore[call-arg]
        "urn:openrpc", document
    )
    rebased = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openrpc#/components/'))
    return Draft202012Validator(rebased, registry=registry, format_checker=FORMAT_CHECKER)


def test_document_is_valid_openrpc() -> None:
    errors = sorted(meta_schema_validator().iter_errors(DOCUMENT), key=str)
    assert errors == []
    assert DOCUMENT["openrpc"] == "1.3.2"
    assert DOCUMENT["servers"] == [{"name": "this server", "url": SERVER_URL}]


def test_every_format_in_use_is_checked() -> None:
    used = formats_used(OPENRPC_META) | formats_used(JSON_SCHEMA_META) | formats_used(DOCUMENT)
    assert {"uri", "uri-reference", "regex", "date-time"} <= used
    unchecked = used - set(FORMAT_CHECKER.checkers)
    assert not unchecked, (
        f"jsonschema does not check the formats {sorted(unchecked)}: install the test extra "
        "(pip install -e .[test]: rfc3986-validator, rfc3339-validator)"
    )


@pytest.mark.parametrize("url", ["/rpc", "rpc", "http://exa mple/rpc", "::1"])
def test_a_server_url_that_is_not_an_absolute_uri_is_refused(url: str) -> None:
    broken = {**DOCUMENT, "servers": [{"name": "this server", "url": url}]}
    errors = list(meta_schema_validator().iter_errors(broken))
    assert [(error.validator, error.validator_value) for error in errors] == [("format", "uri")]
    assert list(errors[0].absolute_path) == ["servers", 0, "url"]


def test_meta_schema_validation_catches_a_broken_document() -> None:
    broken = {**DOCUMENT, "methods": [{**DOCUMENT["methods"][0], "params": "none"}]}
    assert list(meta_schema_validator().iter_errors(broken))
    # A param schema that is not JSON Schema: caught through the locally resolved $ref.
    method = DOCUMENT["methods"][1]
    bad_param = {**method["params"][0], "schema": {"type": 5}}
    broken = {**DOCUMENT, "methods": [{**method, "params": [bad_param]}]}
    assert list(meta_schema_validator().iter_errors(broken))


def test_every_registered_method_is_described_with_its_params_in_order() -> None:
    described = {m["name"]: m for m in DOCUMENT["methods"]}
    assert set(described) == set(REGISTRY.methods) | set(REGISTRY.notifications)
    for name, method in REGISTRY.methods.items():
        fields = method.params().load_fields
        params = described[name]["params"]
        assert [p["name"] for p in params] == list(fields), name
        assert [p["required"] for p in params] == [f.required for f in fields.values()], name
        assert described[name]["summary"] == method.summary
        codes = {e["code"] for e in described[name]["errors"]}
        assert set(method.errors) <= codes and {-32602, -32603} <= codes


def test_params_schemas_carry_the_rules() -> None:
    fulfill = {p["name"]: p for p in next(
        m for m in DOCUMENT["methods"] if m["name"] == "purchase.fulfill")["params"]}  # fmt: skip
    assert fulfill["purchase_state"]["schema"]["enum"] == ["fulfilled", "failed", "canceled"]
    assert fulfill["error_msg"]["schema"]["maxLength"] == 1000
    assert fulfill["purchase_id"]["schema"]["pattern"] == "^[0-9a-z]{1,64}$"


def method_named(name: str) -> dict[str, Any]:
    return next(m for m in DOCUMENT["methods"] if m["name"] == name)


def component(schema: dict[str, Any]) -> dict[str, Any]:
    name = schema["$ref"].removeprefix("#/components/schemas/")
    found: dict[str, Any] = DOCUMENT["components"]["schemas"][name]
    return found


def test_payment_proof_and_the_402_error_are_described() -> None:
    fulfill = method_named("purchase.fulfill")
    params = {p["name"]: p for p in fulfill["params"]}
    assert list(params) == ["purchase_id", "purchase_state", "error_msg", "payment_proof"]
    assert params["payment_proof"]["required"] is False
    proof = component(params["payment_proof"]["schema"])
    assert set(proof["required"]) == set(proof["properties"]) == {
        "id", "timestamp", "signature", "payload"
    }  # fmt: skip
    assert proof["additionalProperties"] is False
    assert proof["properties"]["timestamp"]["type"] == "integer"
    assert proof["properties"]["payload"]["type"] == "string"
    assert "payment_proof" in fulfill["description"]

    (payment,) = [e for e in fulfill["errors"] if e["code"] == 402]
    assert payment["message"] == "Payment not verified"
    assert payment["data"]["required"] == ["reason"]
    assert payment["data"]["properties"]["reason"]["enum"] == PAYMENT_REASONS
    # Only fulfilling needs a payment: no other method lists 402.
    assert [
        m["name"] for m in DOCUMENT["methods"] if 402 in {e["code"] for e in m.get("errors", [])}
    ] == ["purchase.fulfill"]
    # The documented example fulfils with a proof, and that proof fits its schema.
    [example] = fulfill["examples"]
    example_params = {p["name"]: p["value"] for p in example["params"]}
    document_validator(params["payment_proof"]["schema"]).validate(example_params["payment_proof"])
    payload = json.loads(example_params["payment_proof"]["payload"])
    assert payload["type"] == "payment.succeeded"
    assert payload["data"]["purchase_id"] == example_params["purchase_id"]


def test_purchase_events_is_described() -> None:
    events = method_named("purchase.events")
    assert [(p["name"], p["required"]) for p in events["params"]] == [("purchase_id", True)]
    assert events["result"]["schema"]["type"] == "array"
    event = component(events["result"]["schema"]["items"])
    assert set(event["properties"]) == {
        "seq", "purchase_id", "from_state", "to_state", "actor_scope", "actor_email",
        "source", "evidence", "payment_ref", "error_msg", "created_at",
    }  # fmt: skip
    assert event["properties"]["source"]["enum"] == ["rpc", "webhook", "cli", "migration"]
    assert event["properties"]["created_at"]["format"] == "date-time"
    assert {e["code"] for e in events["errors"]} >= {401, 404}


@pytest.mark.parametrize("name", sorted(REGISTRY.methods))
def test_summaries_are_whole_sentences(name: str) -> None:
    """The summary is the docstring's first line: a sentence cut there reads as nonsense."""
    method = method_named(name)
    assert method["summary"].endswith("."), method["summary"]
    description = method.get("description", "")
    assert not description[:1].islower(), description


@pytest.mark.parametrize(
    "method", [m for m in DOCUMENT["methods"] if "examples" in m], ids=lambda m: m["name"]
)
def test_examples_match_their_own_schemas(method: dict[str, Any]) -> None:
    [example] = method["examples"]
    params = {p["name"]: p for p in method["params"]}
    for param in example["params"]:
        document_validator(params[param["name"]]["schema"]).validate(param["value"])
    document_validator(method["result"]["schema"]).validate(example["result"]["value"])


async def test_discover_and_openrpc_json_serve_the_document(
    client: TestClient[Any, Any], rpc: RpcCall
) -> None:
    discovered = await rpc("rpc.discover")  # no token needed
    response = await client.get("/openrpc.json")
    assert response.status == 200
    assert await response.json() == discovered["result"] == json.loads(json.dumps(DOCUMENT))


async def test_docs_page_is_a_readable_self_contained_reference(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    for method in REGISTRY.methods:
        assert f'id="{method}"' in page
    assert "purchase_state" in page and "Timed out" in page
    assert f"POST {SERVER_URL}" in page
    fulfill = page[page.index('id="purchase.fulfill"') : page.index('id="purchase.events"')]
    assert "payment_proof" in fulfill and "Payment not verified" in fulfill
    assert "<code>data.reason</code>" in fulfill
    for reason in PAYMENT_REASONS:
        assert f"&quot;{reason}&quot;" in fulfill
    assert "<script" not in page and 'src="http' not in page and "<link" not in page


async def test_live_answers_match_the_documented_result_schemas(rpc: RpcCall, world: World) -> None:
    """What the server returns is what the document says it returns, formats included."""
    described = {m["name"]: m["result"]["schema"] for m in DOCUMENT["methods"] if "result" in m}
    token = world.alice.token
    created = (await rpc("purchase.create", {"course": "python-basics"}, token=token))["result"]
    fulfill = {"purchase_id": created["purchase_id"], "purchase_state": "fulfilled"}
    # Without a proof: the documented 402, its data as documented.
    body = await rpc("purchase.fulfill", fulfill, token=token)
    refused = assert_error(body, 402, id=body["id"])
    (payment_error,) = [
        e for e in method_named("purchase.fulfill")["errors"] if e["code"] == refused["code"]
    ]
    assert refused["message"].startswith(payment_error["message"])
    document_validator(payment_error["data"]).validate(refused["data"])
    assert refused["data"] == {"reason": "missing"}
    answers = {
        "purchase.create": created,
        "course.list": (await rpc("course.list"))["result"],
        "purchase.get": (await rpc("purchase.get", [created["purchase_id"]], token=token))[
            "result"
        ],
        "purchase.list": (await rpc("purchase.list", {"limit": 1}, token=token))["result"],
        "purchase.fulfill": (
            await rpc(
                "purchase.fulfill", {**fulfill, "payment_proof": proof_for(created)}, token=token
            )
        )["result"],
        "registration.list": (await rpc("registration.list", token=token))["result"],
        "purchase.events": (await rpc("purchase.events", [created["purchase_id"]], token=token))[
            "result"
        ],
    }
    websocket_only = {"rpc.authenticate", "purchase.subscribe", "purchase.unsubscribe"}
    assert set(answers) == set(described) - {"rpc.discover"} - websocket_only
    assert [e["to_state"] for e in answers["purchase.events"]] == ["pending", "fulfilled"]
    for name, value in answers.items():
        document_validator(described[name]).validate(value)
    meta_schema_validator().validate((await rpc("rpc.discover"))["result"])


async def test_websocket_answers_and_notifications_match_the_document(
    client: TestClient[Any, Any], rpc: RpcCall, world: World
) -> None:
    """The WebSocket-only methods answer, and purchase.updated carries, what the
    document describes; the notifications are result-less methods marked as such."""
    described = {m["name"]: m for m in DOCUMENT["methods"]}
    updated = described["purchase.updated"]
    assert "result" not in updated and updated["x-notification"] == "server-to-client"
    assert updated["x-subscription"] == {
        "subscribe": "purchase.subscribe",
        "unsubscribe": "purchase.unsubscribe",
    }
    assert [p["name"] for p in updated["params"]] == ["subscription", "result"]
    assert described["purchase.subscribe"]["servers"][0]["url"].startswith("ws://")
    created = await rpc("purchase.create", {"course": "python-basics"}, token=world.alice.token)
    async with client.ws_connect("/rpc") as ws:
        answers = {}
        for number, (method, params) in enumerate(
            [
                ("rpc.authenticate", {"token": world.alice.token}),
                ("purchase.subscribe", {"since": 0}),
            ]
        ):
            await ws.send_json({"jsonrpc": "2.0", "method": method, "params": params, "id": number})
            answers[method] = (await ws.receive_json(timeout=5))["result"]
        notification = await ws.receive_json(timeout=5)
        assert notification["method"] == "purchase.updated"
        assert notification["params"]["subscription"] == answers["purchase.subscribe"]
        assert (
            notification["params"]["result"]["purchase"]["purchase_id"]
            == (created["result"]["purchase_id"])
        )
        await ws.send_json(
            {"jsonrpc": "2.0", "method": "purchase.unsubscribe", "id": 9,
             "params": {"subscription": answers["purchase.subscribe"]}}
        )  # fmt: skip
        answers["purchase.unsubscribe"] = (await ws.receive_json(timeout=5))["result"]
    assert answers["purchase.unsubscribe"] is True
    for name, value in answers.items():
        document_validator(described[name]["result"]["schema"]).validate(value)
    for param in updated["params"]:
        document_validator(param["schema"]).validate(notification["params"][param["name"]])


def test_a_wrong_date_time_in_an_answer_would_be_caught() -> None:
    """The live check above checks formats: a created_at that is no date-time fails it."""
    events = method_named("purchase.events")["result"]["schema"]
    [example] = method_named("purchase.events")["examples"]
    good = example["result"]["value"]
    document_validator(events).validate(good)
    bad = [{**good[0], "created_at": "yesterday"}, *good[1:]]
    assert [e.validator for e in document_validator(events).iter_errors(bad)] == ["format"]


async def test_public_url_is_the_documented_server(
    app_client: AppClientFactory, settings: Settings
) -> None:
    public = replace(settings, public_url="https://api.shop.example/v1/")
    client = await app_client(settings=public)
    document = await (await client.get("/openrpc.json")).json()
    assert document["servers"] == [
        {"name": "this server", "url": "https://api.shop.example/v1/rpc"}
    ]
    assert not list(meta_schema_validator().iter_errors(document))
    assert "POST https://api.shop.example/v1/rpc" in await (await client.get("/docs")).text()


@pytest.mark.parametrize(
    "value", ["/rpc", "api.shop.example", "ftp://shop.example", "https://x/?a=1", "http://a b"]
)
def test_public_url_must_be_an_absolute_http_url(value: str) -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_PUBLIC_URL"):
        Settings.from_env({"RPC_SERVER_PUBLIC_URL": value})


def test_public_url_never_echoes_a_password() -> None:
    with pytest.raises(ConfigError, match="RPC_SERVER_PUBLIC_URL") as raised:
        Settings.from_env({"RPC_SERVER_PUBLIC_URL": "https://user:s3cret@shop.example"})
    assert "s3cret" not in str(raised.value)


# The reference tooling, @open-rpc/schema-utils-js, run as its users run it: the document
# on stdin, validateOpenRPCDocument's verdict on stdout.
VALIDATE = """
const { validateOpenRPCDocument } = require('@open-rpc/schema-utils-js');
let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const verdict = validateOpenRPCDocument(JSON.parse(input));
  if (verdict === true) {
    console.log('valid');
  } else {
    console.log(verdict.message);
    process.exitCode = 1;
  }
});
"""


def reference_validation(node: str, document: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, "-e", VALIDATE],
        cwd=EXAMPLES,  # where require() finds examples/node_modules
        input=json.dumps(document),
        capture_output=True,
        text=True,
        timeout=60,
    )


def get_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_served_document_passes_the_reference_openrpc_tooling(tmp_path: Path) -> None:
    node = require_node("validating the OpenRPC document with @open-rpc/schema-utils-js")
    install_node_dependencies()
    env = {"RPC_SERVER_DATABASE_URL": sqlite_url(tmp_path / "db.sqlite3"),
           "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail")}  # fmt: skip
    with running_server(env, cwd=tmp_path) as (port, _):
        served = get_json(f"http://127.0.0.1:{port}/openrpc.json")
        # The server URL is absolute and true: the endpoint answers there.
        (server,) = served["servers"]
        assert server["url"] == f"http://127.0.0.1:{port}/rpc"
        discovered = get_json(server["url"], {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1})
        assert discovered["result"] == served

    verdict = reference_validation(node, served)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert verdict.stdout.strip() == "valid"

    # The same tooling refuses what this server once served: a relative server URL.
    relative = {**served, "servers": [{"name": "this server", "url": "/rpc"}]}
    verdict = reference_validation(node, relative)
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr
    assert re.search(r'"dataPath": "\.servers\[0\]\.url"', verdict.stdout), verdict.stdout
    assert '"format": "uri"' in verdict.stdout
