"""Calling the purchase service from Python: jsonrpcclient builds and parses, aiohttp carries.

jsonrpcclient (v4) only builds request objects (``request``, ``notification``) and turns
answers into ``Ok`` or ``Error`` values (``parse``); any HTTP library sends them. This
script buys a course as a shop's frontend would: it creates a purchase, sees that
fulfilling it without a payment is refused (402), pays through the example payment
provider, fulfils with the signed payment event the provider gave it, reads the
purchase's history (purchase.events), then tries a batch and two error cases. It exits
non-zero if any answer is not the one it expects.

Start the server with demo data and the example payment provider first (see the
README), then:

    pip install jsonrpcclient aiohttp
    python examples/python_client.py

Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice; a buyer
who is not yet registered for every course), PROVIDER_URL (default http://127.0.0.1:8090,
examples/payment_provider.py).
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
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8090")


class RpcError(Exception):
    """The server answered a call with a JSON-RPC error object."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code} {error.message}: {error.data!r}")
        self.error = error


class UnexpectedAnswer(Exception):
    """An answer that this walk-through did not expect."""


def show(label: str, value: Any) -> None:
    print(f"{label}: {json.dumps(value, sort_keys=True)}")


def show_error(error: Error) -> None:
    print(f"error: code={error.code} message={error.message} data={json.dumps(error.data)}")


class PurchaseClient:
    """One HTTP session to the endpoint, with the bearer token on every request."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    async def post(self, body: Any) -> Any:
        """POST a request, notification or batch; return the parsed JSON (None for 204)."""
        async with self.session.post(RPC_URL, json=body, headers=self.headers) as response:
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

    async def refused(self, method: str, params: Any, code: int) -> Error:
        """Call a method that must answer the error ``code``; return that error."""
        try:
            result = await self.call(method, params)
        except RpcError as failure:
            show_error(failure.error)
            if failure.error.code != code:
                raise
            return failure.error
        raise UnexpectedAnswer(f"{method} {params} should have failed with {code}: {result}")


async def pay(session: aiohttp.ClientSession, purchase_id: str) -> dict[str, Any]:
    """Pay at the payment provider; it answers with the signed payment event (the proof).

    The provider also posts the same event to the shop's webhook: whichever arrives
    first fulfils, the other changes nothing.
    """
    url = f"{PROVIDER_URL.rstrip('/')}/pay"
    async with session.post(url, json={"purchase_id": purchase_id}) as response:
        answer: dict[str, Any] = await response.json()
        if response.status != 200:
            raise UnexpectedAnswer(f"the payment provider answered {response.status}: {answer}")
    return answer


async def walk_through(client: PurchaseClient) -> None:
    courses = await client.call("course.list")
    show("course.list", [course["slug"] for course in courses])

    # One registration per course: buy one this buyer is not registered for yet.
    registered = {r["course"] for r in await client.call("registration.list")}
    course = next((c["slug"] for c in courses if c["slug"] not in registered), None)
    if course is None:
        raise UnexpectedAnswer(
            "this buyer is registered for every course already: run again with a new "
            "buyer's token, TOKEN=$(rpc-server create-token you@example.com | tail -n 1)"
        )

    # An idempotency key makes a retried create return the same purchase.
    key = f"python-client-{uuid.uuid4().hex}"
    purchase = await client.call("purchase.create", {"course": course, "idempotency_key": key})
    purchase_id = purchase["purchase_id"]
    show("purchase.create", purchase)
    if purchase["state"] != "pending":
        raise UnexpectedAnswer(f"a new purchase should be pending: {purchase}")
    retried = await client.call("purchase.create", {"course": course, "idempotency_key": key})
    if retried != purchase:
        raise UnexpectedAnswer(f"a retried create gave another purchase: {retried}")

    # Params by position, in the order of the README's method table.
    got = await client.call("purchase.get", (purchase_id,))
    show("purchase.get", got)

    page = await client.call("purchase.list", {"state": "pending", "limit": 5})
    show("purchase.list (pending)", [item["purchase_id"] for item in page["items"]])
    if purchase_id not in {item["purchase_id"] for item in page["items"]}:
        raise UnexpectedAnswer("the new purchase is missing from the pending list")

    # Claiming "fulfilled" without paying: 402 Payment not verified, nothing written.
    fulfill = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    unpaid = await client.refused("purchase.fulfill", fulfill, 402)
    if unpaid.data != {"reason": "missing"}:
        raise UnexpectedAnswer(f"fulfilling without a proof: {unpaid.data}")

    # Pay: the provider charges the amount the shop stores and signs one payment event.
    paid = await pay(client.session, purchase_id)
    proof = paid["payment_proof"]
    event = json.loads(proof["payload"])
    show("paid", event)
    print(f"webhook: {json.dumps(paid['webhook'].get('answer'), sort_keys=True)}")
    if event["type"] != "payment.succeeded" or event["data"]["amount"] != purchase["amount"]:
        raise UnexpectedAnswer(f"the provider charged {event}")

    # Fulfil with the proof, twice: the same answer, and nothing happens twice.
    paid_fulfill = {**fulfill, "payment_proof": proof}
    first = await client.call("purchase.fulfill", paid_fulfill)
    second = await client.call("purchase.fulfill", paid_fulfill)
    show("purchase.fulfill", first)
    if first != second or first["purchase"]["state"] != "fulfilled":
        raise UnexpectedAnswer(f"fulfilling twice gave {first} and then {second}")
    print("purchase.fulfill again: identical answer, nothing new happened")
    print(f"redirect_url: {first['redirect_url']}")

    # The purchase's history: every state change, who made it, on what evidence.
    events = await client.call("purchase.events", {"purchase_id": purchase_id})
    for change in events:
        print(
            f"purchase.events: #{change['seq']} {change['from_state']} -> "
            f"{change['to_state']} by {change['source']} ({change['evidence']}) "
            f"payment_ref={change['payment_ref']}"
        )
    changes = [(change["from_state"], change["to_state"]) for change in events]
    if changes != [(None, "pending"), ("pending", "fulfilled")]:
        raise UnexpectedAnswer(f"the history should be created, then fulfilled once: {events}")
    if events[-1]["payment_ref"] != event["data"]["payment_ref"]:
        raise UnexpectedAnswer("the fulfillment does not name the payment that paid for it")

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

    # Two conflicts (409): a fulfilled purchase cannot be canceled, and a buyer who is
    # registered for a course cannot buy it again.
    await client.refused("purchase.fulfill", (purchase_id, "canceled"), 409)
    again = await client.refused("purchase.create", {"course": course}, 409)
    if again.data != {"course": course}:
        raise UnexpectedAnswer(f"buying a course again: {again.data}")


async def main() -> int:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await walk_through(PurchaseClient(session))
        except (RpcError, UnexpectedAnswer, aiohttp.ClientError, TimeoutError) as failure:
            print(f"failed: {type(failure).__name__}: {failure}", file=sys.stderr)
            return 1
    print("all calls answered as expected")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
