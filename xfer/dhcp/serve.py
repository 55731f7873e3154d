"""``xfer dhcp serve``: keep the snooping database file and the map in shape.

The datapath creates and removes bindings on its own (DHCP is parsed in the
kernel), so this process is *not* needed for enforcement. It adds what only
user space can do:

- writes the snooping database file within ``interval`` seconds of any change
  the datapath made (ACK, renewal, RELEASE, DECLINE, NAK), with fsync;
- sweeps expired bindings from the map (the datapath already refuses them,
  and deletes one when a packet meets it; the sweep catches the silent ones).

It runs in the foreground under a supervisor (systemd unit, or the test's
``Hosts.spawn``) and stops cleanly on SIGTERM/SIGINT, writing the file once more.

    snooper = Snooper("sw1", interval=0.2)
    asyncio.run(snooper.run())          # until snooper.stop() or a signal
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from xfer.dhcp.store import BindingTable

log = logging.getLogger(__name__)


class Snooper:
    """The persister/sweeper loop for one device. ``start``/``stop`` are explicit."""

    def __init__(self, namespace: str | None, interval: float = 0.2,
                 db_path: Path | None = None) -> None:
        self.namespace = namespace
        self.interval = interval
        self.db_path = db_path
        self.saves = 0
        self.swept = 0
        self._stop = asyncio.Event()
        self._last: tuple[tuple[object, ...], ...] | None = None

    def stop(self) -> None:
        self._stop.set()

    def _snapshot(self, table: BindingTable) -> tuple[tuple[object, ...], ...]:
        # raw map state: a renewal changes expires_ns, which must be written too
        return tuple(sorted((bytes(k.mac), bytes(k.ip), v.expires_ns, v.ifindex, v.vlan, v.flags)
                            for k, v in table.map.items()))

    def tick(self, table: BindingTable) -> bool:
        """One round: sweep, then save if anything changed. True when it saved."""
        swept = table.sweep()
        if swept:
            self.swept += swept
            log.info("swept %d expired bindings", swept)
        snap = self._snapshot(table)
        if snap == self._last:
            return False
        table.save(sync=True)
        self._last = snap
        self.saves += 1
        return True

    async def run(self, install_signals: bool = True) -> None:
        """Loop until ``stop()`` (or SIGTERM/SIGINT when ``install_signals``)."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        try:
            with BindingTable(self.namespace, db_path=self.db_path) as table:
                log.info("serving DHCP snooping database %s for %s", table.db_path,
                         self.namespace or "this namespace")
                while not self._stop.is_set():
                    started = time.monotonic()
                    self.tick(table)
                    wait = max(0.0, self.interval - (time.monotonic() - started))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), wait)
                self.tick(table)
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
