"""What an operator does to a device's DHCP snooper: attach, detach, static bindings.

The CLI (``xfer dhcp ...``) and the daemon call these; both share the rule that
the pinned maps are authoritative while they exist, and the snooping database
file is replayed only into freshly created maps (after a reboot or a purge).

    attach("sw1", trusted=["uplink"], untrusted=["vm0"])
    add_static("sw1", Binding("02:00:00:00:00:09", "10.0.0.9", None, "vm0", source="static"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xfer.dhcp import datapath
from xfer.dhcp.model import Binding
from xfer.dhcp.store import BindingTable


@dataclass
class AttachReport:
    ports: dict[str, int]
    restored: int = 0
    kept: int = 0
    warnings: list[str] = field(default_factory=list)


def attach(namespace: str | None, trusted: Sequence[str], untrusted: Sequence[str],
           mode: str = "enforce", db_path: Path | None = None) -> AttachReport:
    """Attach (or re-attach) the snooper; restore the database file into fresh maps.

    >>> attach("sw1", ["uplink"], ["vm0", "vm1"], mode="observe")  # doctest: +SKIP
    AttachReport(ports={'uplink': 2, 'vm0': 3, 'vm1': 4}, restored=0, kept=0, warnings=[])
    """
    done = datapath.attach(namespace, trusted, untrusted, mode)
    report = AttachReport(done.ports)
    with BindingTable(namespace, db_path=db_path) as table:
        if done.fresh_maps:
            result = table.restore()
            report.restored = result.created
            report.warnings = result.warnings
        else:
            report.kept = len(table.bindings())
        table.save()
    return report


def detach(namespace: str | None, purge: bool = False) -> int:
    """Remove the filters; with ``purge`` also the pinned maps (the file stays)."""
    return datapath.detach(namespace, purge=purge)


def add_static(namespace: str | None, binding: Binding, db_path: Path | None = None
               ) -> tuple[bool, list[str]]:
    """Install one binding by hand; returns (created, warnings)."""
    with BindingTable(namespace, db_path=db_path) as table:
        result = table.add([binding])
    return result.created == 1, result.warnings


def delete(namespace: str | None, mac: str, ip: str, db_path: Path | None = None) -> bool:
    """Remove the binding (mac, ip), whatever its source; False when there was none."""
    with BindingTable(namespace, db_path=db_path) as table:
        return table.remove([Binding(mac, ip, None)]) == 1
