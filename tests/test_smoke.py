from __future__ import annotations


async def test_send_reaches_subscriber(connect) -> None:  # type: ignore[no-untyped-def]
    sub = await connect()
    pub = await connect()
    assert await sub.request({"command": "subscribe", "topic": "t"}) == {"success": True}
    assert await pub.request(
        {"command": "send", "topic": "t", "msg": "hi", "delivery": "all"}
    ) == {"success": True}
    assert await sub.receive() == {
        "command": "send", "topic": "t", "msg": "hi", "delivery": "all", "index": 0
    }
