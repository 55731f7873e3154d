"""One leader among managers sharing an etcd journal: a lease, and a leader key bound to it.

A manager campaigns with one transaction: create the leader key (its name and
message URL) bound to its own lease, if the key does not exist. The winner keeps
its lease alive (every third of ``lease_s``); when it dies the lease ends, etcd
deletes the key, and the next campaign of another manager wins it, within
``lease_s`` plus a third. The creation revision of the key is the winner's fence:
every journal write compares it (``etcd.EtcdJournal.fence``).

While etcd cannot be reached the leader stays leader (etcd renews leases when it
comes back) but is not sure of it: ``sure`` is false once ``lease_s`` passed
without a renewal, and the manager then refuses new messages.

    election = Election(client, "/xfer/", "mgr-1", "https://10.0.4.9:8700/v1/migrations", 3.0)
    task = asyncio.ensure_future(election.run(on_elected, on_deposed))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from xfer.manager.etcdclient import EtcdClient, EtcdError, Txn, range_values

log = logging.getLogger("xfer.manager")


class Election:
    """Campaign for, hold, and lose the leadership; ``leader_url`` is whoever holds it."""

    def __init__(self, client: EtcdClient, prefix: str, name: str, url: str, lease_s: float) -> None:
        self.client, self.name, self.url, self.lease_s = client, name, url, lease_s
        self.key = (prefix + "leader").encode()
        self.lease = 0
        self.fence: tuple[bytes, int] | None = None
        self.leader_url: str | None = None
        self.leader_name: str | None = None
        self._renewed = 0.0

    @property
    def leading(self) -> bool:
        return self.fence is not None

    @property
    def sure(self) -> bool:
        """Leading, and the lease renewed within ``lease_s``."""
        return self.leading and time.monotonic() - self._renewed < self.lease_s

    async def campaign(self) -> bool:
        """One attempt: True when this manager holds the leader key (now or already)."""
        # A follower's lease ends between campaigns unless renewed: renew it, or take a new one.
        if not self.lease or await self.client.keepalive(self.lease) <= 0:
            self.lease = await self.client.grant(self.lease_s)
        self._renewed = time.monotonic()
        value = json.dumps({"name": self.name, "url": self.url}).encode()
        txn = Txn().created_at(self.key, 0).put(self.key, value, self.lease).otherwise_get(self.key)
        won, responses, revision = await self.client.txn(txn)
        if won:
            self.fence = (self.key, revision)
            self.leader_url, self.leader_name = self.url, self.name
            return True
        found = range_values(responses)
        if found:
            holder = json.loads(found[0].value)
            self.leader_url, self.leader_name = holder.get("url"), holder.get("name")
            if found[0].lease == self.lease:   # ours already (a campaign whose answer was lost)
                self.fence = (self.key, found[0].create_revision)
                return True
        return False

    async def renew(self) -> bool:
        """Keep the lease alive; False when it has ended (another manager may lead now)."""
        ttl = await self.client.keepalive(self.lease)
        if ttl <= 0:
            return False
        self._renewed = time.monotonic()
        return True

    async def run(self, elected: Callable[[], Awaitable[None]],
                  deposed: Callable[[], Awaitable[None]]) -> None:
        """Campaign until elected, lead until the lease ends, again; forever (cancel to stop)."""
        every = self.lease_s / 3
        while True:
            try:
                if not self.leading:
                    if await self.campaign():
                        log.info(json.dumps({"event": "elected", "name": self.name, "url": self.url}))
                        try:
                            await elected()
                        except EtcdError:
                            # Could not take over (recovery's journal writes failed): let another try.
                            await self.resign()
                            raise
                elif not await self.renew():
                    log.warning(json.dumps({"event": "deposed", "name": self.name,
                                            "reason": "the leader lease ended"}))
                    self.fence, self.lease = None, 0
                    await deposed()
                    continue
            except EtcdError as exc:
                log.warning(json.dumps({"event": "etcd unreachable", "error": str(exc)}))
            await asyncio.sleep(every)

    async def resign(self) -> None:
        """Give the leadership up now (a clean stop): the others need not wait for the lease."""
        if self.lease:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self.lease)
        self.fence, self.lease = None, 0
