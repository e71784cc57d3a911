"""GET /docs: the OpenRPC document rendered as a readable HTML reference, server-side.

One self-contained page (inline CSS, no scripts, no external assets), built from the
same document ``rpc.discover`` returns, so the two cannot disagree. It is served with
``CONTENT_SECURITY_POLICY``, which allows exactly its one stylesheet (by hash) and
nothing else: no scripts, images, forms, frames, nor being framed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from html import escape
from typing import Any

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font:13px ui-monospace,monospace;background:#f5f5f5}
pre{padding:.6rem;overflow-x:auto}
table{border-collapse:collapse;margin:.4rem 0}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
section{border-top:2px solid #eee;margin-top:2rem}
nav a{margin-right:.8rem}
"""

_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _json(value: Any) -> str:
    return escape(json.dumps(value, indent=2, ensure_ascii=False))


def _type_of(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    return " | ".join(kind) if isinstance(kind, list) else str(kind)


def _constraints(schema: Mapping[str, Any]) -> str:
    keys = ("pattern", "minLength", "maxLength", "minimum", "maximum", "format", "description")
    return "; ".join(f"{key}: {schema[key]}" for key in keys if key in schema)


def _error_data(schema: Any) -> str:
    """What an error's ``data`` carries, from the JSON Schema the document gives for it."""
    if not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping):
        return ""
    items = "".join(
        f"<li><code>data.{escape(name)}</code>: {escape(_type_of(field))}"
        f"{'. ' + escape(field['description']) if field.get('description') else ''}</li>"
        for name, field in schema["properties"].items()
    )
    return f"<ul>{items}</ul>"


def _method(method: Mapping[str, Any]) -> str:
    name = escape(method["name"])
    rows = "".join(
        f"<tr><td>{i}</td><td><code>{escape(p['name'])}</code></td>"
        f"<td>{escape(_type_of(p['schema']))}</td><td>{'yes' if p.get('required') else 'no'}</td>"
        f"<td>{escape(_constraints(p['schema']))}</td></tr>"
        for i, p in enumerate(method["params"])
    )
    params = (
        "<table><tr><th>#</th><th>param</th><th>type</th><th>required</th><th>rules</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>No params.</p>"
    )
    errors = "".join(
        f"<tr><td><code>{e['code']}</code></td><td>{escape(e['message'])}"
        f"{_error_data(e.get('data'))}</td></tr>"
        for e in method.get("errors", [])
    )
    parts = [
        f'<section id="{name}"><h2><code>{name}</code></h2>',
        f"<p>{escape(method.get('summary', ''))}</p>",
    ]
    if method.get("x-notification"):
        parts.append(
            "<p><strong>Notification sent by the server</strong> over a WebSocket to a "
            f"<code>{escape(method['x-subscription']['subscribe'])}</code> subscription: "
            "never called, never answered.</p>"
        )
    elif method.get("x-transport") == "websocket":
        parts.append("<p><strong>Over a WebSocket connection to /rpc only.</strong></p>")
    if method.get("description"):
        parts.append(f"<p>{escape(method['description'])}</p>")
    parts += ["<h3>Params</h3>", params]
    if "result" in method:
        parts += [
            f"<h3>Result: <code>{escape(method['result']['name'])}</code></h3>",
            f"<pre>{_json(method['result']['schema'])}</pre>",
        ]
    if errors:
        parts.append(
            f"<h3>Errors</h3><table><tr><th>code</th><th>meaning</th></tr>{errors}</table>"
        )
    for example in method.get("examples", []):
        request = {
            "jsonrpc": "2.0",
            "method": method["name"],
            "params": {p["name"]: p["value"] for p in example["params"]},
            "id": 1,
        }
        response = {"jsonrpc": "2.0", "result": example["result"]["value"], "id": 1}
        parts.append(
            f"<h3>Example: {escape(example['name'])}</h3>"
            f"<pre>{_json(request)}</pre><pre>{_json(response)}</pre>"
        )
    parts.append("</section>")
    return "".join(parts)


def _servers(servers: list[Mapping[str, Any]]) -> str:
    return "".join(
        f"<p>Endpoint: <code>POST {escape(server['url'])}</code>; WebSocket: <code>GET "
        f"{escape(server['url'])}</code> with <code>Upgrade: websocket</code></p>"
        for server in servers
    )


def render(document: Mapping[str, Any]) -> str:
    """The HTML page for an OpenRPC document."""
    info = document["info"]
    methods = document["methods"]
    nav = "".join(f'<a href="#{escape(m["name"])}">{escape(m["name"])}</a>' for m in methods)
    schemas = "".join(
        f'<h3 id="schema-{escape(name)}">{escape(name)}</h3><pre>{_json(schema)}</pre>'
        for name, schema in document.get("components", {}).get("schemas", {}).items()
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(info['title'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(info['title'])} <small>{escape(info['version'])}</small></h1>"
        f"<p>{escape(info.get('description', ''))}</p>"
        f"{_servers(document.get('servers', []))}"
        "<p>Machine-readable: <a href='/openrpc.json'>/openrpc.json</a> or the "
        "<code>rpc.discover</code> method (OpenRPC "
        f"{escape(document['openrpc'])}).</p>"
        f"<nav>{nav}</nav>{''.join(_method(m) for m in methods)}"
        f"<section><h2>Schemas</h2>{schemas}</section></body></html>"
    )
