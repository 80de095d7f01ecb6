"""Slowing down failed logins per source host (docs/security.md, "Brute force and cost").

After a failure, a host's next attempt waits 0.25 s, doubling per further failure up to
10 s; attempts from a host with failures take turns, so opening many connections at
once does not multiply its guesses. A host quiet for a while is forgotten, and the table
holds a bounded number of hosts (the oldest go first).
"""

from __future__ import annotations

import ipaddress

import attrs
import trio

from ._errors import AuthFailed


def host_key(peer: str) -> str:
    """The unit that is slowed down: an IPv4 address, or an IPv6 /64 (one subscriber's
    network: an attacker there has billions of addresses, not billions of networks)."""
    try:
        address = ipaddress.ip_address(peer.strip("[]").split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.define
class _Host:
    failures: int = 0
    last_failure: float = 0.0
    next_slot: float = 0.0
    waiting: int = 0


@attrs.define
class Throttle:
    """Per-host failure memory, on trio's clock (so tests can use a MockClock)."""

    first_delay: float = 0.25
    max_delay: float = 10.0
    #: Seconds without a failure after which a host starts over.
    forget_after: float = 120.0
    max_hosts: int = 10_000
    #: Attempts of one failing host that may wait for their turn; more fail at once.
    max_waiting: int = 16
    _hosts: dict[str, _Host] = attrs.field(factory=dict, repr=False)

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.first_delay * 2.0 ** min(failures - 1, 64), self.max_delay)

    def _current(self, key: str, now: float) -> _Host | None:
        host = self._hosts.get(key)
        if host is not None and now - host.last_failure > self.forget_after and not host.waiting:
            del self._hosts[key]
            return None
        return host

    async def wait_turn(self, peer: str) -> None:
        """Return when ``peer`` may have its next attempt verified."""
        now = trio.current_time()
        host = self._current(host_key(peer), now)
        if host is None:
            await trio.lowlevel.checkpoint()
            return
        if host.waiting >= self.max_waiting:
            await trio.lowlevel.checkpoint()
            raise AuthFailed("too many attempts waiting from this host after failures")
        slot = max(now, host.next_slot)
        host.next_slot = slot + self.delay(host.failures)
        host.waiting += 1
        try:
            await trio.sleep_until(slot)
        finally:
            host.waiting -= 1

    def failed(self, peer: str) -> None:
        """Record a failed attempt from ``peer``."""
        key = host_key(peer)
        now = trio.current_time()
        host = self._current(key, now)
        if host is None:
            host = _Host()
        else:
            del self._hosts[key]  # re-inserted last: the dict's order is by last failure
        while len(self._hosts) >= self.max_hosts:
            del self._hosts[next(iter(self._hosts))]
        self._hosts[key] = host
        host.failures += 1
        host.last_failure = now
        host.next_slot = max(host.next_slot, now + self.delay(host.failures))

    def __len__(self) -> int:
        return len(self._hosts)
