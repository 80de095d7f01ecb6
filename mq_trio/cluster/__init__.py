"""Cluster mode (``mq-trio serve --cluster redis://...``): several nodes as one broker
over Redis. Imported only when cluster mode is asked for (it needs ``hiredis``: the
``cluster`` extra)."""

from ._resp import (
    Command,
    RedisAddress,
    RedisConnection,
    RedisError,
    RedisUnavailable,
    Script,
    Subscription,
    is_noscript,
    load_scripts,
    open_redis,
    open_subscription,
    parse_redis_url,
)
from ._slots import ClusterConnections, ClusterMap, key_slot, open_cluster, slot_tags

__all__ = [
    "ClusterConnections",
    "ClusterMap",
    "Command",
    "RedisAddress",
    "RedisConnection",
    "RedisError",
    "RedisUnavailable",
    "Script",
    "Subscription",
    "is_noscript",
    "key_slot",
    "load_scripts",
    "open_cluster",
    "open_redis",
    "open_subscription",
    "parse_redis_url",
    "slot_tags",
]
