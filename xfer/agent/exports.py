"""Concurrent conntrack exports from one device share their work.

An evacuation sends many migrations at once, each asking the source device for
one VM's entries. Each filtered dump walks the host's whole conntrack hash, so
exports one by one cost (VMs x table). Here requests that arrive while a walk
runs wait for the next one, and that one walk serves them all (entries sorted
to their VMs by address). A VM the pre-copy tracker follows needs no walk at
all: its entries come from the index (O(its entries)).

    shared = SharedExports("fw-src", tracker_of=lambda: precopy.source.started)
    stream = await shared.export(vm)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from xfer.conntrack.shared import export_many
from xfer.conntrack.stream import Stream
from xfer.conntrack.tracker import Tracker
from xfer.model import VmIdentity


def _from_index(tracker: Tracker, vm: VmIdentity) -> Stream:
    """The VM's entries from the index, its suspects (maybe silent) re-read first."""
    tracker.verify(vm.id)
    return tracker.export(vm.id)


class SharedExports:
    """One table walk for the exports that wait together (see the module docstring)."""

    def __init__(self, namespace: str | None,
                 tracker_of: Callable[[], Tracker | None] = lambda: None) -> None:
        self.namespace = namespace
        self._tracker_of = tracker_of
        self._pending: list[tuple[VmIdentity, asyncio.Future[Stream]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.walks = 0
        self.served = 0

    async def export(self, vm: VmIdentity) -> Stream:
        tracker = self._tracker_of()
        if tracker is not None and vm.id in tracker.index:
            return await asyncio.to_thread(_from_index, tracker, vm)
        future: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
        self._pending.append((vm, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            vms = [vm for vm, _ in batch]
            try:
                result = await asyncio.to_thread(self._walk, vms)
            except Exception as exc:  # each waiter gets the error of the walk it waited for
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for vm, fut in batch:
                if not fut.done():
                    fut.set_result(result[vm.id])

    def _walk(self, vms: list[VmIdentity]) -> dict[str, Stream]:
        self.walks += 1
        self.served += len(vms)
        return export_many(vms, self.namespace)
