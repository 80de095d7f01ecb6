"""The pytest plugin's work-queue helpers, used as an application's tests would use
them: the ``mq_server``/``mq_client`` fixtures, ``queue_state`` and ``wait_for_queue``."""

from __future__ import annotations

import pytest
import trio

from mq_trio.broker import QueueInfo
from mq_trio.client import Client
from mq_trio.server import Server
from mq_trio.testing import ClientFactory, queue_state, wait_for_queue


async def test_a_topic_without_jobs_is_all_zero(mq_server: Server) -> None:
    assert queue_state(mq_server, "nothing here") == QueueInfo()


async def test_queue_state_follows_a_job(mq_server: Server, mq_client: Client) -> None:
    await mq_client.send_job("orders", "order 1")
    state = queue_state(mq_server, "orders")
    assert (state.waiting, state.in_flight, state.consumers) == (1, 0, 0)
    async with mq_client.consume("orders") as jobs:
        job = await jobs.receive()
        state = queue_state(mq_server, "orders")
        assert (state.waiting, state.in_flight, state.consumers) == (0, 1, 1)
        assert state.delivered_total == 1
        await job.ack()
        state = queue_state(mq_server, "orders")
        assert (state.in_flight, state.acked_total) == (0, 1)


async def test_wait_for_queue_returns_the_state_that_satisfied_it(
    mq_server: Server, mq_client_factory: ClientFactory, nursery: trio.Nursery
) -> None:
    producer = await mq_client_factory()
    worker = await mq_client_factory()

    async def work() -> None:
        async with worker.consume("orders", prefetch=5) as jobs:
            async for job in jobs:
                await job.ack()

    nursery.start_soon(work)
    for i in range(5):
        await producer.send_job("orders", f"order {i}")
    state = await wait_for_queue(mq_server, "orders", lambda q: q.acked_total == 5)
    assert (state.acked_total, state.waiting, state.in_flight) == (5, 0, 0)


async def test_wait_for_queue_fails_the_test_with_the_last_state(
    mq_server: Server, mq_client: Client
) -> None:
    await mq_client.send_job("orders", "never taken")

    def taken(q: QueueInfo) -> bool:
        return q.in_flight == 1

    with pytest.raises(AssertionError) as failed:
        await wait_for_queue(mq_server, "orders", taken, timeout=0.05)
    text = str(failed.value)
    assert text.startswith("queue 'orders': taken did not hold within 0.05 s; last state: ")
    assert "waiting=1" in text


@pytest.mark.mq_server(ack_timeout=0.1)
async def test_waiting_for_the_server_s_own_clock(
    mq_server: Server, mq_client_factory: ClientFactory
) -> None:
    """A job held past the ack timeout is delivered again (to the consumer that still has
    room): wait for the server to do it rather than sleeping a guessed time."""
    worker = await mq_client_factory()
    await worker.send_job("orders", "slow")
    async with worker.consume("orders") as jobs:
        first = await jobs.receive()
        state = await wait_for_queue(mq_server, "orders", lambda q: q.redelivered_total >= 1)
        assert state.in_flight == 1
        again = await jobs.receive()
        assert again.index == first.index and again.deliveries >= 2
