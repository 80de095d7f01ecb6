"""The server's counters (server/_stats.py) as connections come and go: what the
metrics and /stats report is computed from these."""

from __future__ import annotations

import trio
from support import LineClient, start_server


async def test_traffic_of_closed_connections_stays_counted(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    line = b'{"command": "send", "topic": "t", "msg": "m", "delivery": "all"}\n'
    client = await LineClient.connect(server.port)
    await client.send_raw(line + b"not json\n")
    assert await client.receive_many(2) == [
        {"success": True}, {"success": False, "reason": "Could not parse json"}
    ]
    await client.aclose()
    await server.wait_until(lambda: not server.connections)
    stats = server.stats
    assert (stats.closed_lines_in, stats.closed_bytes_in) == (2, len(line) + 9)
    assert stats.closed_messages_out == 2
    # out: the JSON objects written (the line terminators or WebSocket frames not counted)
    assert stats.closed_bytes_out == len(b'{"success": true}') + len(
        b'{"success": false, "reason": "Could not parse json"}')
    assert stats.failures == {"Could not parse json": 1}
    assert stats.connections_total == 1
