"""The topology file (YAML): servers, devices, links, gateways, and an optional VM inventory.

    servers:
      hv1: {gateway: gw}
      hv2: {gateway: gw}
    devices:
      fw-a:  {type: firewall, kinds: [conntrack, dhcp], agent: "https://10.0.4.1:7443"}
      rt-a:  {type: router, kinds: []}                 # on the path, holds nothing
      fw-b:  {type: firewall, kinds: [conntrack, counters], agent: "https://10.0.4.2:7443"}
      sw-b:  {type: switch, kinds: [dhcp], agent: "https://10.0.4.3:7443"}
    gateways: [gw]
    links:
      - [hv1, fw-a]
      - [fw-a, rt-a]
      - [rt-a, gw]
      - [hv2, sw-b]
      - [sw-b, fw-b]
      - [fw-b, gw]
    vms:                                               # optional inventory
      vm1: {mac: "02:00:00:00:00:02", ipv4: ["10.0.1.2"], ipv6: ["fd00:1::2"]}

A server's *uplink path* is the shortest chain of links from the server to its
gateway; its devices, nearest the server first, are the ones that may hold the
state of the VMs it hosts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer.agent.protocol import check_agent_url
from xfer.errors import UsageError, XferError
from xfer.model import DEVICE_TYPES, Kind, VmIdentity, make_identity, parse_kinds
from xfer.tomlfile import syntax_error


class TopologyError(UsageError):
    """The topology file is malformed, or has no path where one is needed."""


@dataclass(frozen=True)
class Device:
    """One device on some uplink path; ``agent`` is its agent's URL ('' when it holds nothing)."""

    id: str
    type: str
    kinds: tuple[Kind, ...]
    agent: str = ""

    def holds(self, kind: Kind) -> bool:
        return kind in self.kinds


@dataclass(frozen=True)
class Topology:
    servers: dict[str, str]                     # server -> its gateway
    devices: dict[str, Device]
    links: tuple[tuple[str, str], ...]
    gateways: frozenset[str]
    vms: dict[str, VmIdentity] = field(default_factory=dict)

    def neighbours(self) -> dict[str, list[str]]:
        adj: dict[str, list[str]] = {}
        for a, b in self.links:
            adj.setdefault(a, []).append(b)
            adj.setdefault(b, []).append(a)
        return adj

    def server(self, name: str) -> str:
        """The gateway of server ``name``; TopologyError naming the known servers otherwise."""
        if name not in self.servers:
            raise TopologyError(f"unknown server {name!r} (topology has {', '.join(sorted(self.servers))})")
        return self.servers[name]

    def vm(self, spec: str) -> VmIdentity:
        """A VM of the inventory by name, or addresses (``10.0.1.2,02:..``) as ``--vm`` takes them."""
        from xfer.model import parse_vm

        if spec in self.vms:
            return self.vms[spec]
        try:
            return parse_vm(spec, {})
        except UsageError:
            known = ", ".join(sorted(self.vms)) or "none"
            raise UsageError(f"unknown VM {spec!r}: not in the topology's inventory "
                             f"(known: {known}) and not a list of addresses") from None


def uplink_path(topo: Topology, server: str) -> list[str]:
    """The nodes from ``server`` to its gateway, both ends excluded (BFS: the shortest path).

    >>> uplink_path(example(), "hv1")      # doctest: +SKIP
    ['fw-a', 'rt-a']
    """
    gateway = topo.server(server)
    adj = topo.neighbours()
    previous: dict[str, str] = {server: ""}
    queue = deque([server])
    while queue:
        node = queue.popleft()
        if node == gateway:
            break
        for nxt in adj.get(node, ()):
            # Other servers and gateways are not transit nodes of this server's uplink.
            if nxt in previous or (nxt != gateway and (nxt in topo.servers or nxt in topo.gateways)):
                continue
            previous[nxt] = node
            queue.append(nxt)
    if gateway not in previous:
        raise TopologyError(f"server {server!r} has no path to its gateway {gateway!r}")
    path = []
    node = previous[gateway]
    while node != server:
        path.append(node)
        node = previous[node]
    return path[::-1]


def path_devices(topo: Topology, server: str) -> list[Device]:
    """The devices of a server's uplink path, nearest the server first."""
    return [topo.devices[n] for n in uplink_path(topo, server) if n in topo.devices]


# --- loading -------------------------------------------------------------------------------


def load(path: Path) -> Topology:
    """Read and check a topology file; TopologyError names the defect.

    >>> load(Path("/etc/xfer/topology.yaml")).servers   # doctest: +SKIP
    {'hv1': 'gw', 'hv2': 'gw'}
    """
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TopologyError(f"topology file {path} not found") from None
    except OSError as exc:
        raise TopologyError(f"topology {path}: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if mark is None:
            raise TopologyError(f"topology {path}: {exc.problem or exc}") from None
        where = syntax_error("topology", path, mark.line + 1, mark.column + 1,
                             " ".join(filter(None, (exc.problem, exc.context))))
        raise TopologyError(str(where)) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"topology {path}: {exc}") from None
    return parse(raw)


def parse(raw: Any) -> Topology:
    """Build a Topology from parsed YAML and check it (names, kinds, agents, links, paths)."""
    if not isinstance(raw, Mapping):
        raise TopologyError("topology: the file must be a mapping with servers, devices, links")
    unknown = sorted(set(raw) - {"servers", "devices", "links", "gateways", "vms"})
    if unknown:
        raise TopologyError(f"topology: unknown key(s) {', '.join(unknown)}")
    gateways = frozenset(str(g) for g in _list(raw, "gateways"))
    servers = {str(name): _server(name, spec) for name, spec in _map(raw, "servers").items()}
    if not servers:
        raise TopologyError("topology: no servers")
    devices = {str(name): _device(str(name), spec) for name, spec in _map(raw, "devices").items()}
    for name, gw in servers.items():
        if gw not in gateways:
            raise TopologyError(f"topology: server {name!r} names gateway {gw!r}, "
                                f"which is not in gateways ({', '.join(sorted(gateways)) or 'none'})")
    clash = (set(servers) & set(devices)) | (set(servers) & gateways)
    if clash:
        raise TopologyError(f"topology: {', '.join(sorted(clash))} named twice (server and device/gateway)")
    known = set(servers) | set(devices) | gateways
    links = tuple(_link(i, item, known) for i, item in enumerate(_list(raw, "links")))
    vms = {str(n): _vm(str(n), spec) for n, spec in _map(raw, "vms").items()}
    topo = Topology(servers, devices, links, gateways, vms)
    for name in servers:
        uplink_path(topo, name)   # every server must reach its gateway
    return topo


def _map(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise TopologyError(f"topology: {key} must be a mapping")
    return value


def _list(raw: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise TopologyError(f"topology: {key} must be a list")
    return value


def _server(name: Any, spec: Any) -> str:
    if not isinstance(spec, Mapping) or not spec.get("gateway"):
        raise TopologyError(f"topology: server {name!r} needs a gateway")
    return str(spec["gateway"])


def _device(name: str, spec: Any) -> Device:
    if not isinstance(spec, Mapping):
        raise TopologyError(f"topology: device {name!r} must be a mapping (type, kinds, agent)")
    dtype = str(spec.get("type", ""))
    if dtype not in DEVICE_TYPES:
        raise TopologyError(f"topology: device {name!r} type {dtype!r} is not one of "
                            f"{', '.join(DEVICE_TYPES)}")
    kinds_raw = spec.get("kinds") or []
    if not isinstance(kinds_raw, list):
        raise TopologyError(f"topology: device {name!r} kinds must be a list")
    try:
        kinds = parse_kinds([str(k) for k in kinds_raw]) if kinds_raw else ()
    except UsageError as exc:
        raise TopologyError(f"topology: device {name!r}: {exc}") from None
    agent = str(spec.get("agent") or "")
    if kinds and not agent:
        raise TopologyError(f"topology: device {name!r} holds {', '.join(kinds)} but names no agent")
    if agent:
        try:
            agent = check_agent_url(agent)
        except UsageError as exc:
            raise TopologyError(f"topology: device {name!r}: {exc}") from None
    return Device(name, dtype, kinds, agent)


def _link(index: int, item: Any, known: set[str]) -> tuple[str, str]:
    if not isinstance(item, list) or len(item) != 2:
        raise TopologyError(f"topology: link {index + 1} must be a pair [a, b], not {item!r}")
    a, b = str(item[0]), str(item[1])
    for end in (a, b):
        if end not in known:
            raise TopologyError(f"topology: link {index + 1} [{a}, {b}] names unknown node {end!r}")
    return a, b


def _vm(name: str, spec: Any) -> VmIdentity:
    if not isinstance(spec, Mapping):
        raise TopologyError(f"topology: vm {name!r} must be a mapping (mac, ipv4, ipv6)")
    tokens: list[str] = []
    for key in ("mac", "ipv4", "ipv6"):
        value = spec.get(key) or []
        tokens += [value] if isinstance(value, str) else [str(v) for v in value]
    try:
        vm = make_identity(name, tokens)
    except (UsageError, ValueError) as exc:
        raise TopologyError(f"topology: vm {name!r}: {exc}") from None
    if not vm.addresses and not vm.macs:
        raise TopologyError(f"topology: vm {name!r} has no address")
    return vm


def describe(topo: Topology) -> list[str]:
    """One line per server: its uplink path with each device's kinds (``xfer topology show``)."""
    lines = []
    for name in sorted(topo.servers):
        try:
            hops = [f"{n}[{','.join(topo.devices[n].kinds) or '-'}]" if n in topo.devices else n
                    for n in uplink_path(topo, name)]
        except XferError as exc:
            lines.append(f"{name}: {exc}")
            continue
        lines.append(" -> ".join([name, *hops, topo.servers[name]]))
    return lines
