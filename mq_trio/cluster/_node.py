"""A node's connection to the cluster: the Redis history's tasks, kept running.

The flusher's connection and the intake's subscription reconnect by themselves
(backoff up to ``MAX_BACKOFF``); while the flusher is down every send fails at once with
``Storage unavailable`` and subscribers stay connected. Only the first connection must
succeed: a node that cannot reach Redis at start does not start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from ._history import LEASE_SECONDS, RedisHistory, prepare
from ._links import Links, intake_channels, open_links
from ._resp import RedisAddress, RedisError, RedisUnavailable, parse_redis_url

log = logging.getLogger("mq_trio.cluster")

MAX_BACKOFF = 2.0
#: A job's claim in Redis outlasts the node's own ack timeout by this much (at most
#: the ack timeout again), so the node's deadline and redelivery come first.
CLAIM_MARGIN = 5.0


class ClusterUnavailable(Exception):
    """Redis could not be reached when the node started."""


@asynccontextmanager
async def open_node(url: str, *, cache_size: int, dedupe_window: float,
                    lease: float = LEASE_SECONDS, ack_timeout: float = 30.0,
                    max_queue_jobs: int = 100_000) -> AsyncIterator[RedisHistory]:
    """The node's shared history over the Redis at ``url``, its tasks running."""
    address = parse_redis_url(url)
    history = RedisHistory(address, cache_size=cache_size, dedupe_window=dedupe_window,
                           lease=lease,
                           claim=ack_timeout + min(CLAIM_MARGIN, ack_timeout),
                           max_queue_jobs=max_queue_jobs)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(_keep_flushing, history)
            intakes = await intake_channels(address)
            history.intakes = len(intakes)
            for server, channels in intakes:
                await nursery.start(_keep_intake, history, server, channels)
        except (RedisUnavailable, RedisError) as exc:
            raise ClusterUnavailable(f"cannot use Redis at {url}: {exc}") from exc
        log.info("cluster: node %s on %s, epoch %s", history.node, url, history.epoch)
        try:
            yield history
        finally:
            nursery.cancel_scope.cancel()


async def _backoff(delay: float) -> float:
    await trio.sleep(delay)
    return min(delay * 2, MAX_BACKOFF)


async def _keep_flushing(history: RedisHistory,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    started = False
    delay = 0.05
    while True:
        try:
            async with open_links(history.address,
                                  f"mq-trio:{history.node}:commands") as links:
                await prepare(links, history)
                if not started:
                    started = True
                    task_status.started()
                elif delay > 0.05:
                    log.warning("cluster: Redis at %s is back", _where(history.address))
                delay = 0.05
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(_until_broken, history.run_renewals, links,
                                     tasks.cancel_scope)
                    tasks.start_soon(_until_broken, history.run_job_polls, links,
                                     tasks.cancel_scope)
                    await _until_broken(history.run_flusher, links, tasks.cancel_scope)
        except (RedisUnavailable, RedisError) as exc:
            # (a Redis Cluster answers CLUSTERDOWN while a master rejoins: as unavailable)
            if not started:
                raise
            if delay == 0.05:
                log.warning("cluster: Redis at %s unavailable (%s): sends fail until it "
                            "is back", _where(history.address), exc)
        delay = await _backoff(delay)


async def _until_broken(run: Callable[[Links], Awaitable[None]],
                        links: Links, scope: trio.CancelScope) -> None:
    """Run one of a connection's tasks; when the connection breaks, end the others
    (bare, not in an exception group: the caller reconnects)."""
    try:
        await run(links)
    except RedisUnavailable as exc:
        log.debug("cluster: connection broke: %s", exc)
        scope.cancel()


async def _keep_intake(history: RedisHistory, server: RedisAddress, channels: list[str],
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
    first = True
    delay = 0.05
    while True:
        subscribed = history.subscriptions
        try:
            await history.run_intake(server, channels,
                                     task_status if first else trio.TASK_STATUS_IGNORED)
        except (RedisUnavailable, RedisError) as exc:
            if first and history.subscriptions == subscribed:
                raise
            log.warning("cluster: lost the frames channel on %s (%s); resubscribing",
                        _where(server), exc)
        if history.subscriptions != subscribed:
            first = False
            delay = 0.05
        delay = await _backoff(delay)


def _where(address: RedisAddress) -> str:
    return f"{address.host}:{address.port}"
