from tests.conftest import RpcCall, World


async def test_course_list_needs_no_token(rpc: RpcCall, world: World) -> None:
    body = await rpc("course.list")
    assert [c["slug"] for c in body["result"]] == ["python-basics", "sql-fundamentals"]
    assert body["result"][0]["price"] == "49.00"


async def test_create_then_get(rpc: RpcCall, world: World) -> None:
    created = await rpc("purchase.create", {"course": "python-basics"}, token=world.alice.token)
    purchase_id = created["result"]["purchase_id"]
    got = await rpc("purchase.get", [purchase_id], token=world.alice.token)
    assert got["result"] == created["result"]
