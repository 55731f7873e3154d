"""Device selection: which device gives each kind and which devices take it.

For each kind the source is the device on the source server's uplink path that
holds it (the nearest the server when several do: the others are named in the
route's ``also_held_by``, neither moved nor cleaned); the destinations are every
device on the destination path that holds it. A kind with no holder on one side
is reported in ``missing``, never silently dropped.

A plan may be made without a destination (a libvirt source does not know it):
its routes have no destinations until ``resolve`` fills them in from the
destination server that announces itself.

    plan = select(topo, "hv1", "hv2", [Kind.CONNTRACK, Kind.DHCP])
    plan.routes[0]   # Route(kind=conntrack, source=fw-a, destinations=(fw-b,))
    later = resolve(select(topo, "hv1", ""), topo, "hv2")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from xfer.manager.topology import Device, Topology, TopologyError, path_devices
from xfer.model import Kind


@dataclass(frozen=True)
class Route:
    kind: Kind
    source: Device
    destinations: tuple[Device, ...]
    # Other devices on the source path that hold the kind too: reported, not moved.
    also_held_by: tuple[Device, ...] = ()


@dataclass
class Plan:
    """Routes per kind, and kinds that cannot move (with the reason)."""

    source: str
    destination: str
    routes: list[Route] = field(default_factory=list)
    missing: dict[Kind, str] = field(default_factory=dict)

    def kinds(self) -> tuple[Kind, ...]:
        return tuple(r.kind for r in self.routes)

    def by_source(self) -> dict[Device, list[Kind]]:
        """Source device -> the kinds it gives (one export per device)."""
        out: dict[Device, list[Kind]] = {}
        for r in self.routes:
            out.setdefault(r.source, []).append(r.kind)
        return out

    def pairs(self) -> dict[tuple[Device, Device], list[Kind]]:
        """(source, destination) -> kinds moving between them (one push or pull per pair)."""
        out: dict[tuple[Device, Device], list[Kind]] = {}
        for r in self.routes:
            for d in r.destinations:
                out.setdefault((r.source, d), []).append(r.kind)
        return out

    def destinations(self) -> dict[Device, list[Kind]]:
        out: dict[Device, list[Kind]] = {}
        for r in self.routes:
            for d in r.destinations:
                out.setdefault(d, []).append(r.kind)
        return out

    def also_held_by(self) -> dict[Kind, tuple[Device, ...]]:
        """Kinds that other source-path devices hold too, and those devices (not moved, not cleaned)."""
        return {r.kind: r.also_held_by for r in self.routes if r.also_held_by}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination,
                "routes": [{"kind": r.kind.value, "source": r.source.id,
                            "destinations": [d.id for d in r.destinations],
                            **({"also_held_by": [d.id for d in r.also_held_by]} if r.also_held_by else {})}
                           for r in self.routes],
                "missing": {k.value: why for k, why in self.missing.items()}}


def select(topo: Topology, source: str, destination: str, kinds: Sequence[Kind] | None = None) -> Plan:
    """Route each kind (default: every kind some device holds) from source to destination path.

    ``destination`` "" makes a source-only plan (what to export); ``resolve`` completes it.

    >>> [(r.kind.value, r.source.id) for r in select(topo, "hv1", "hv2").routes]  # doctest: +SKIP
    [('conntrack', 'fw-a'), ('dhcp', 'fw-a')]
    """
    if source == destination:
        raise TopologyError(f"source and destination are the same server {source!r}")
    src_devices = path_devices(topo, source)
    dst_devices = path_devices(topo, destination) if destination else []
    wanted = tuple(kinds) if kinds else tuple(
        k for k in Kind if any(d.holds(k) for d in (*src_devices, *dst_devices)))
    plan = Plan(source, "")
    for kind in wanted:
        givers = [d for d in src_devices if d.holds(kind)]
        if givers:
            plan.routes.append(Route(kind, givers[0], (), tuple(givers[1:])))
        elif any(d.holds(kind) for d in dst_devices) or not destination:
            plan.missing[kind] = f"no device on {source}'s uplink path holds {kind}"
        else:
            plan.missing[kind] = f"no device on either path holds {kind}"
    return resolve(plan, topo, destination) if destination else plan


def resolve(plan: Plan, topo: Topology, destination: str) -> Plan:
    """``plan`` with the destination devices of each kind on ``destination``'s uplink path;
    a kind no device there holds moves to ``missing`` (its state would be lost).

    >>> resolve(select(topo, "hv1", ""), topo, "hv2").destination    # doctest: +SKIP
    'hv2'
    """
    if plan.source == destination:
        raise TopologyError(f"source and destination are the same server {destination!r}")
    dst_devices = path_devices(topo, destination)
    out = Plan(plan.source, destination, missing=dict(plan.missing))
    for r in plan.routes:
        takers = tuple(d for d in dst_devices if d.holds(r.kind))
        if takers:
            out.routes.append(replace(r, destinations=takers))
        else:
            out.missing[r.kind] = (f"no device on {destination}'s uplink path holds {r.kind} "
                                   f"(held by {r.source.id} at the source): it would be lost")
    return out
