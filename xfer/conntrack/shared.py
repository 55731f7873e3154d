"""Several VMs' entries from one walk of the table (evacuations: many exports at once).

>>> streams = export_many([vm1, vm2], "fw-src")        # doctest: +SKIP
>>> section_of(streams[vm1.id]).count                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from xfer.bundle import Section
from xfer.conntrack import constants as c
from xfer.conntrack import stream as stream_mod
from xfer.conntrack import transfer, wire
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.stream import HDR, Stream
from xfer.model import VmIdentity


def split_by_vm(dump: Stream, vms: Sequence[VmIdentity]) -> dict[str, Stream]:
    """The entries of ``dump`` that belong to each VM (one pass; an entry between two of
    them goes to both)."""
    owners: dict[bytes, list[str]] = {}
    for vm in vms:
        for addr in vm.packed_addresses:
            owners.setdefault(addr, []).append(vm.id)
    kept = transfer._filtered(dump, frozenset(owners))
    parts: dict[str, list[bytes]] = {vm.id: [] for vm in vms}
    payload = kept.payload
    for off in kept.offsets:
        end = off + stream_mod.length_at(payload, off)
        orig_src, reply_src, _ = wire.endpoint_sources(payload[off + HDR:end])
        ids = set(owners.get(orig_src, ())) | set(owners.get(reply_src, ()))
        msg = payload[off:off + c.align4(end - off)]
        for vm_id in ids:
            parts[vm_id].append(msg)
    return {vm_id: stream_mod.from_parts(msgs) for vm_id, msgs in parts.items()}


def export_many(vms: Sequence[VmIdentity], namespace: str | None) -> dict[str, Stream]:
    """Each VM's entries: one VM alone by the kernel-filtered dumps of ``transfer``; several
    from one unfiltered walk shared by all of them."""
    if len(vms) == 1:
        return {vms[0].id: transfer.export_stream(vms[0], namespace)}
    with CtNetlink(namespace) as ct:
        dump = ct.dump_all()
    return split_by_vm(dump, vms)


def section_of(entries: Stream) -> Section:
    """A bundle section of the entries (no zone or mark selectors)."""
    return transfer._section(entries, transfer.Selectors())
