"""Keeps a ``ConntrackIndex`` in step with one namespace's table: events, dumps, re-reads.

The order that makes the index exact: subscribe first (the listener exists and
its filter passes the VM's addresses), then dump. Every change after the
subscription is queued in order, so applying the queue after the dump ends at
the kernel's present state, whatever the dump caught. Lost events (ENOBUFS):
dump again the same way (``resync``). Entries only ever seen in a dump may be
silent (see ``events``): ``verify`` re-reads them by tuple (a hash lookup each,
no table walk).

Needs CAP_NET_ADMIN in the namespace (see ``netlink``, ``events``).

>>> with Tracker("fw-src") as tr:                     # doctest: +SKIP
...     tr.track([vm]); tr.start()
...     bulk = tr.export(vm.id); cur = tr.cursor(vm.id)
...     delta = tr.changes(vm.id, cur)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType

from xfer.conntrack import constants as c
from xfer.conntrack import stream, transfer, wire
from xfer.conntrack.events import RECEIVE_BUFFER, EventListener, EventsLost
from xfer.conntrack.index import Changes, ConntrackIndex
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.stream import HDR, Stream
from xfer.model import VmIdentity

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
# Tracking this many VMs at once: one unfiltered dump beats two filtered ones each.
BATCH_SEED = 3


def _get_request(message: bytes, seq: int) -> bytes:
    attrs = wire.split(message[HDR:stream.length_at(message, 0)])
    body = attrs[c.CTA_TUPLE_ORIG] + attrs.get(c.CTA_ZONE, b"")
    return wire.message(c.MSG_CT_GET, c.NLM_F_REQUEST, seq, message[16], body)


class Tracker:
    """An event listener and an index for one namespace (see the module docstring)."""

    def __init__(self, namespace: str | None = None, *, trust_seed: bool = False,
                 buffer: int = RECEIVE_BUFFER) -> None:
        self.namespace = namespace
        self.listener = EventListener(namespace, buffer=buffer)
        self.index = ConntrackIndex(trust_seed=trust_seed)
        self.lost = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- tracked set --------------------------------------------------------------

    def track(self, vms: Sequence[VmIdentity]) -> None:
        """Start tracking VMs (already tracked ones are left as they are)."""
        with self._lock:
            new = [vm for vm in vms if vm.id not in self.index]
            if not new:
                return
            self._pump_locked()
            addrs = set(self.index.addresses())
            for vm in new:
                addrs |= vm.packed_addresses
            self.listener.set_filter(sorted(addrs))
            if len(new) >= BATCH_SEED:
                dump = self._dump_owned(new)
                for vm in new:
                    self.index.track(vm, dump)
            else:
                for vm in new:
                    self.index.track(vm, transfer.export_stream(vm, self.namespace))
            self._pump_locked()

    def untrack(self, vm_id: str) -> None:
        with self._lock:
            self.index.untrack(vm_id)
            self.listener.set_filter(sorted(self.index.addresses()))

    def _dump_owned(self, vms: Sequence[VmIdentity]) -> Stream:
        """One walk of the table, kept to the entries of ``vms``."""
        owned: frozenset[bytes] = frozenset().union(*(vm.packed_addresses for vm in vms))
        with CtNetlink(self.namespace) as ct:
            dump = ct.dump_all()
        return transfer._filtered(dump, owned)

    # --- keeping up ---------------------------------------------------------------

    def pump(self) -> int:
        """Apply every queued event now; resync after a loss. Returns events applied."""
        with self._lock:
            return self._pump_locked()

    def _pump_locked(self) -> int:
        used = 0
        while True:
            try:
                events = self.listener.read()
            except EventsLost:
                self.lost += 1
                log.warning("conntrack events lost in %s; resyncing %d VMs",
                            self.namespace or "(current)", len(self.index.tracked()))
                self._resync_locked()
                continue
            if not events:
                return used
            used += self.index.apply(events)

    def resync(self) -> None:
        """Dump the tracked VMs again and log every difference (a loss, or on request)."""
        with self._lock:
            self._resync_locked()

    def _resync_locked(self) -> None:
        vms = [self.index._state(v).identity for v in self.index.tracked()]
        if vms:
            self.index.resync(self._dump_owned(vms))

    def verify(self, vm_id: str) -> int:
        """Re-read the VM's suspects (entries never named by an event) by tuple and log
        what changed or went; returns how many were re-read."""
        with self._lock:
            self._pump_locked()
            asked = self.index.suspects(vm_id)
            if not asked:
                return 0
            with CtNetlink(self.namespace) as ct:
                base = ct.reserve(len(asked))
                found = ct.get_many([_get_request(m, base + i) for i, m in enumerate(asked)])
            self.index.confirm(vm_id, found, asked)
            return len(asked)

    def start(self) -> None:
        """Pump in a background thread until ``stop`` (so the buffer never fills up)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="conntrack-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.listener.wait(POLL_SECONDS):
                    self.pump()
            except Exception:  # keep tracking; the next pump retries (and resyncs)
                log.exception("conntrack event pump failed")
                self._stop.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.listener.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------

    def export(self, vm_id: str) -> Stream:
        """The VM's entries now (queued events applied first)."""
        with self._lock:
            self._pump_locked()
            return self.index.export(vm_id)

    def cursor(self, vm_id: str) -> str:
        with self._lock:
            self._pump_locked()
            return self.index.cursor(vm_id)

    def snapshot(self, vm_id: str) -> tuple[Stream, str]:
        """The VM's entries now and the cursor they are current at (one step)."""
        with self._lock:
            self._pump_locked()
            return self.index.export(vm_id), self.index.cursor(vm_id)

    def changes(self, vm_id: str, cursor: str, *, verify: bool = True) -> Changes:
        """What changed after ``cursor`` (queued events applied, suspects re-read)."""
        with self._lock:
            if verify:
                self.verify(vm_id)
            else:
                self._pump_locked()
            return self.index.changes(vm_id, cursor)
