"""Calling the purchase service from Python: jsonrpcclient builds and parses, aiohttp carries.

jsonrpcclient (v4) only builds request objects (``request``, ``notification``) and turns
answers into ``Ok`` or ``Error`` values (``parse``); any HTTP library sends them. This
script walks through every method, a batch and an error case, and exits non-zero if any
answer is not the one it expects.

Start the server with demo data first (see the README), then:

    pip install jsonrpcclient aiohttp
    python examples/python_client.py

Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aiohttp
from jsonrpcclient import Error, Ok, notification, parse, request

RPC_URL = os.environ.get("RPC_URL", "http://127.0.0.1:8080/rpc")
TOKEN = os.environ.get("TOKEN", "demo-alice")


class RpcError(Exception):
    """The server answered a call with a JSON-RPC error object."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code} {error.message}: {error.data!r}")
        self.error = error


class UnexpectedAnswer(Exception):
    """An answer that this walk-through did not expect."""


def show(label: str, value: Any) -> None:
    print(f"{label}: {json.dumps(value, sort_keys=True)}")


class PurchaseClient:
    """One HTTP session to the endpoint, with the bearer token on every request."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post(self, body: Any) -> Any:
        """POST a request, notification or batch; return the parsed JSON (None for 204)."""
        async with self.session.post(RPC_URL, json=body) as response:
            if response.status == 204:  # only notifications: nothing to answer
                return None
            response.raise_for_status()
            return await response.json()

    async def call(self, method: str, params: Any = None) -> Any:
        """Call one method; return its result or raise ``RpcError`` with the error."""
        answer = parse(await self.post(request(method, params)))
        if isinstance(answer, Ok):
            return answer.result
        assert isinstance(answer, Error)
        raise RpcError(answer)


async def walk_through(client: PurchaseClient) -> None:
    courses = await client.call("course.list")
    show("course.list", [course["slug"] for course in courses])

    # An idempotency key makes a retried create return the same purchase.
    key = f"python-client-{uuid.uuid4().hex}"
    purchase = await client.call(
        "purchase.create", {"course": courses[0]["slug"], "idempotency_key": key}
    )
    purchase_id = purchase["purchase_id"]
    show("purchase.create", purchase)
    if purchase["state"] != "pending":
        raise UnexpectedAnswer(f"a new purchase should be pending: {purchase}")
    retried = await client.call(
        "purchase.create", {"course": courses[0]["slug"], "idempotency_key": key}
    )
    if retried != purchase:
        raise UnexpectedAnswer(f"a retried create gave another purchase: {retried}")

    # Params by position, in the order of the README's method table.
    got = await client.call("purchase.get", (purchase_id,))
    show("purchase.get", got)

    page = await client.call("purchase.list", {"state": "pending", "limit": 5})
    show("purchase.list (pending)", [item["purchase_id"] for item in page["items"]])
    if purchase_id not in {item["purchase_id"] for item in page["items"]}:
        raise UnexpectedAnswer("the new purchase is missing from the pending list")

    fulfill = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    first = await client.call("purchase.fulfill", fulfill)
    second = await client.call("purchase.fulfill", fulfill)
    show("purchase.fulfill", first)
    if first != second or first["purchase"]["state"] != "fulfilled":
        raise UnexpectedAnswer(f"fulfilling twice gave {first} and then {second}")
    print("purchase.fulfill again: identical answer, nothing new happened")
    print(f"redirect_url: {first['redirect_url']}")

    registrations = await client.call("registration.list")
    show("registration.list", [r["course"] for r in registrations])
    if purchase_id not in {r["purchase_id"] for r in registrations}:
        raise UnexpectedAnswer("fulfilling did not register the buyer")

    # A batch: one POST, one answer per request (in any order: match them by id), none
    # for the notification.
    batch = [
        request("course.list", id="courses"),
        request("purchase.get", {"purchase_id": purchase_id}, id="get"),
        request("purchase.get", {"purchase_id": "0" * 32}, id="missing"),
        notification("course.list"),
    ]
    answers = {answer.id: answer for answer in parse(await client.post(batch))}
    for answer_id, answer in sorted(answers.items()):
        if isinstance(answer, Ok):
            print(f"batch {answer_id}: ok")
        else:
            print(f"batch {answer_id}: error {answer.code} {answer.message}")
    if set(answers) != {"courses", "get", "missing"}:
        raise UnexpectedAnswer(f"batch answered ids {sorted(answers)}")
    if not isinstance(answers["get"], Ok) or not isinstance(answers["missing"], Error):
        raise UnexpectedAnswer(f"batch answers: {answers}")

    # An error case: a fulfilled purchase cannot be canceled (409 Conflict).
    try:
        await client.call("purchase.fulfill", (purchase_id, "canceled"))
    except RpcError as failure:
        error = failure.error
        print(f"error: code={error.code} message={error.message} data={json.dumps(error.data)}")
        if error.code != 409:
            raise
    else:
        raise UnexpectedAnswer("canceling a fulfilled purchase succeeded")


async def main() -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        try:
            await walk_through(PurchaseClient(session))
        except (RpcError, UnexpectedAnswer, aiohttp.ClientError, TimeoutError) as failure:
            print(f"failed: {type(failure).__name__}: {failure}", file=sys.stderr)
            return 1
    print("all calls answered as expected")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
