"""``xfer dhcp serve``: keep the snooping database file and the map in shape.

The datapath creates and removes bindings on its own (DHCP is parsed in the
kernel), so this process is *not* needed for enforcement. It adds what only
user space can do:

- writes the snooping database file within ``interval`` seconds of any change
  the datapath made (ACK, renewal, RELEASE, DECLINE, NAK), with fsync;
- sweeps expired bindings from the map (the datapath already refuses them,
  and deletes one when a packet meets it; the sweep catches the silent ones);
- logs a warning when the datapath refused bindings since the last round (a
  port at its limit, or the table full), one line per port and round, naming
  the limit, how many were refused and the last MAC/IP refused.

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

from xfer.dhcp.store import TABLE_SIZE, BindingTable

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
        self._refused: dict[tuple[str, str], int] | None = None

    def stop(self) -> None:
        self._stop.set()

    def _snapshot(self, table: BindingTable) -> tuple[tuple[object, ...], ...]:
        # raw map state: a renewal changes expires_ns, which must be written too
        return tuple(sorted((bytes(k.mac), bytes(k.ip), v.expires_ns, v.ifindex, v.vlan, v.flags)
                            for k, v in table.map.items()))

    def report_refusals(self, table: BindingTable) -> int:
        """Log the bindings refused since the last call (the first call logs every one so far).

        Returns how many lines were logged.
        """
        refused = {(port, name): n for port, counts in table.counters().items()
                   for name, n in counts.items() if name.startswith("binding_refused")}
        before, self._refused = self._refused or {}, refused
        changed = {k: n - before.get(k, 0) for k, n in refused.items() if n > before.get(k, 0)}
        if not changed:
            return 0
        last = table.refusals()
        limits = {p.name: p.max_bindings for p in table.ports()}
        for (port, name), n in sorted(changed.items()):
            reason, mac, ip = last.get(port, (name, "?", "?"))
            if reason != name:      # the last refusal had the other reason
                mac, ip = "?", "?"
            why = (f"port at its limit of {limits.get(port)} bindings (--max-bindings)"
                   if name == "binding_refused_port_limit" else
                   f"binding table full ({TABLE_SIZE} bindings)")
            log.warning("dhcp binding refused on %s: %s; %d refused since the last report "
                        "(%d in all), last %s %s", port, why, n, refused[(port, name)], mac, ip)
        return len(changed)

    def tick(self, table: BindingTable) -> bool:
        """One round: sweep, report refusals, then save if anything changed. True when it saved."""
        self.report_refusals(table)
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
