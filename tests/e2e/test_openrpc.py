"""The OpenRPC document: valid against the published meta-schema, true to the registry,
and true to what the server actually answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft7Validator, Draft202012Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT7, DRAFT202012

from rpc_server.methods import REGISTRY
from rpc_server.openrpc import build_document
from tests.conftest import RpcCall, World

DATA = Path(__file__).resolve().parents[1] / "data" / "openrpc"
OPENRPC_META = json.loads((DATA / "open-rpc-meta-schema-1.14.9.json").read_text())
JSON_SCHEMA_META = json.loads((DATA / "json-schema-tools-meta-schema-1.8.0.json").read_text())
DOCUMENT = build_document(REGISTRY)


def no_network(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)


def meta_schema_validator() -> Draft7Validator:
    """The OpenRPC meta-schema, its $ref to the JSON Schema meta-schema resolved locally."""
    tools = Resource.from_contents(JSON_SCHEMA_META, default_specification=DRAFT7)
    registry: Registry[Any] = Registry(retrieve=no_network).with_resources(  # type: ignore[call-arg]
        [("https://meta.json-schema.tools", tools), ("https://meta.json-schema.tools/", tools)]
    )
    return Draft7Validator(OPENRPC_META, registry=registry)


def document_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Validate against ``schema``, whose $refs point into the document's components."""
    document = Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry(retrieve=no_network).with_resource(  # type: ignore[call-arg]
        "urn:openrpc", document
    )
    rebased = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openrpc#/components/'))
    return Draft202012Validator(rebased, registry=registry)


def test_document_is_valid_openrpc() -> None:
    errors = sorted(meta_schema_validator().iter_errors(DOCUMENT), key=str)
    assert errors == []
    assert DOCUMENT["openrpc"] == "1.3.2"


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
    assert set(described) == set(REGISTRY.methods)
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
    assert "<script" not in page and 'src="http' not in page and "<link" not in page


async def test_live_answers_match_the_documented_result_schemas(rpc: RpcCall, world: World) -> None:
    """What the server returns is what the document says it returns."""
    described = {m["name"]: m["result"]["schema"] for m in DOCUMENT["methods"]}
    token = world.alice.token
    created = (await rpc("purchase.create", {"course": "python-basics"}, token=token))["result"]
    answers = {
        "purchase.create": created,
        "course.list": (await rpc("course.list"))["result"],
        "purchase.get": (await rpc("purchase.get", [created["purchase_id"]], token=token))[
            "result"
        ],
        "purchase.list": (await rpc("purchase.list", {"limit": 1}, token=token))["result"],
        "purchase.fulfill": (
            await rpc(
                "purchase.fulfill",
                {"purchase_id": created["purchase_id"], "purchase_state": "fulfilled"},
                token=token,
            )
        )["result"],
        "registration.list": (await rpc("registration.list", token=token))["result"],
    }
    for name, value in answers.items():
        document_validator(described[name]).validate(value)
    meta_schema_validator().validate((await rpc("rpc.discover"))["result"])
