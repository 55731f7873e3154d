"""The agent's configuration file (TOML): what the device is, holds and listens on.

Example (``/etc/xfer/agent.toml``)::

    [device]
    id = "fw-src-1"
    type = "firewall"               # firewall | router | switch | load-balancer
    kinds = ["conntrack", "counters"]
    netns = "xfer-fwsrc"            # optional: the namespace whose state it holds

    [listen]
    address = "10.0.4.1"            # the API (mutual TLS only)
    port = 7443
    metrics = "127.0.0.1:9464"      # optional plain-HTTP Prometheus endpoint

    [tls]                           # relative paths are relative to this file
    cert = "fw-src-1.pem"
    key = "fw-src-1.key"
    ca = "ca.pem"
    allowed_peers = []              # optional: certificate common names allowed in

    [limits]
    max_bundle_bytes = 67108864
    max_connections = 256           # slow clients (xfer/net/guard.py): open TCP connections,
    handshake_timeout_s = 5         # the TLS handshake, and from it to the first request's
    header_timeout_s = 10           # headers; these are the defaults

    [state]
    dir = "/var/lib/xfer/agent"     # the import journal
    bundle_key_file = ""            # optional HMAC key: sign exports, require on import

    [counters]
    interfaces = ["vm0"]            # attached when the device holds counters
    max_keys = 65536                # table size in (MAC, IP) keys, ~280 bytes of kernel memory each

    [dhcp]
    trusted = "up0"                 # attached when the device holds dhcp
    untrusted = ["vm0"]
    max_bindings = 16               # per untrusted port, learned from DHCP (0: no limit)

    [privsep]                       # optional (docs/privsep.md): the network-facing process
    user = "xfer"                   # drops every capability and runs as this user; a
                                    # privileged helper does the kernel work

    [precopy]                       # optional (conntrack devices)
    events_trusted = false          # true: nf_conntrack_events was 1 before any flow (sysctl.d),
                                    # so entries known from a dump need no re-read
    expire_s = 600                  # a stage with no news this long is removed

    [manager]                       # optional: the device-driven variant
    url = "https://10.0.4.9:8700"   # the manager (mutual TLS, this agent's certificate)
    group = "239.7.7.7:8702"        # the multicast group migration messages are sent to
    interface = "10.0.4.1"          # address of the interface to join it on
    device = "fw-src-1"             # this device's id in the manager's topology (default: device.id)

    [vdp]                           # optional: answer 802.1Qbg VDP on host-facing ports (docs/vdp.md)
    ports = ["p1", "p2"]            # in device.netns
    server = "hv7"                  # the server behind them
    manager = "https://10.0.4.9:8700/v1/migrations"   # with this agent's [tls] files; or udp = "H:P"
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer import tomlfile
from xfer.agent.protocol import check_agent_url
from xfer.errors import UsageError
from xfer.model import DEVICE_TYPES, Kind, parse_kinds
from xfer.net import address as addr
from xfer.net.guard import ConnectionLimits, limits_from
from xfer.net.tls import TlsFiles
from xfer.vdp.config import VdpConfig, parse_section

DEFAULT_PORT = 7443
DEFAULT_MAX_BUNDLE = 64 * 1024 * 1024
DEFAULT_STATE_DIR = Path("/var/lib/xfer/agent")


@dataclass(frozen=True)
class UpstreamConfig:
    """The manager this agent works with in the device-driven variant, and the group it joins."""

    url: str
    group: tuple[str, int]
    interface: str
    device: str


@dataclass(frozen=True)
class AgentConfig:
    """One device's agent configuration; see the module docstring for the file."""

    device_id: str
    device_type: str
    kinds: tuple[Kind, ...]
    tls: TlsFiles
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    netns: str | None = None
    metrics: tuple[str, int] | None = None
    allowed_peers: frozenset[str] = frozenset()
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE
    state_dir: Path = DEFAULT_STATE_DIR
    bundle_key_file: Path | None = None
    counter_interfaces: tuple[str, ...] = ()
    counter_max_keys: int | None = None
    dhcp_trusted: str | None = None
    dhcp_untrusted: tuple[str, ...] = ()
    dhcp_max_bindings: int = 16
    manager: UpstreamConfig | None = None
    vdp: VdpConfig | None = None
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    privsep_user: str | None = None
    precopy_events_trusted: bool = False
    precopy_expire_s: float = 600.0

    @property
    def url(self) -> str:
        """The URL peers use to reach this agent."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"

    def holds(self, kind: Kind) -> bool:
        return kind in self.kinds


def load(path: Path) -> AgentConfig:
    """Read and check an agent configuration file. Raises UsageError naming the defect.

    >>> load(Path("/etc/xfer/agent.toml")).device_id   # doctest: +SKIP
    'fw-src-1'
    """
    return parse(tomlfile.read(path, "agent config"), base=path.parent)


def parse(raw: Mapping[str, Any], base: Path = Path(".")) -> AgentConfig:
    """Build an AgentConfig from parsed TOML; relative paths are taken from ``base``."""
    known = {"device", "listen", "tls", "limits", "state", "counters", "dhcp", "manager", "vdp",
             "privsep",
             "precopy"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"agent config: unknown section(s) {', '.join(unknown)}")
    device = _table(raw, "device")
    listen = _table(raw, "listen")
    tls = _table(raw, "tls")
    limits = _table(raw, "limits")
    state = _table(raw, "state")
    counters = _table(raw, "counters")
    dhcp = _table(raw, "dhcp")

    device_id = _str(device, "device.id", required=True)
    device_type = _str(device, "device.type", required=True)
    if device_type not in DEVICE_TYPES:
        raise UsageError(f"agent config: device.type {device_type!r} is not one of "
                         f"{', '.join(DEVICE_TYPES)}")
    kinds_raw = device.get("kinds")
    if not isinstance(kinds_raw, list) or not kinds_raw:
        raise UsageError("agent config: device.kinds must list at least one kind")
    kinds = parse_kinds([str(k) for k in kinds_raw])

    address = _str(listen, "listen.address") or "127.0.0.1"
    addr.check_ip(address, "agent config: listen.address")
    port = addr.port(listen.get("port", DEFAULT_PORT), "agent config: listen.port")
    metrics = (addr.hostport(listen["metrics"], "agent config: listen.metrics")
               if listen.get("metrics") else None)

    def path_of(table: Mapping[str, Any], key: str, name: str, required: bool) -> Path | None:
        text = _str(table, name, required=required, key=key)
        return (base / text) if text else None

    tls_files = TlsFiles(*(path_of(tls, k, f"tls.{k}", True) or Path() for k in ("cert", "key", "ca")))
    peers = tls.get("allowed_peers", [])
    if not isinstance(peers, list):
        raise UsageError("agent config: tls.allowed_peers must be a list of names")

    max_bytes = limits.get("max_bundle_bytes", DEFAULT_MAX_BUNDLE)
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise UsageError("agent config: limits.max_bundle_bytes must be an integer >= 1024")

    interfaces = counters.get("interfaces", [])
    untrusted = dhcp.get("untrusted", [])
    if not isinstance(interfaces, list) or not isinstance(untrusted, list):
        raise UsageError("agent config: counters.interfaces and dhcp.untrusted must be lists")
    if Kind.COUNTERS in kinds and not interfaces:
        raise UsageError("agent config: the device holds counters but counters.interfaces is empty")
    max_keys = counters.get("max_keys")
    if max_keys is not None and (isinstance(max_keys, bool) or not isinstance(max_keys, int)
                                 or not 1024 <= max_keys <= 1 << 24):
        raise UsageError("agent config: counters.max_keys must be an integer from 1024 to "
                         f"{1 << 24}")
    trusted = _str(dhcp, "dhcp.trusted", key="trusted") or None
    if Kind.DHCP in kinds and (not trusted or not untrusted):
        raise UsageError("agent config: the device holds dhcp but dhcp.trusted/untrusted are not set")
    max_bindings = dhcp.get("max_bindings", 16)
    if isinstance(max_bindings, bool) or not isinstance(max_bindings, int) \
            or not 0 <= max_bindings < 0xFFFF:
        raise UsageError("agent config: dhcp.max_bindings must be an integer from 0 (no per-port "
                         "limit) to 65534")

    netns = _str(device, "device.netns", key="netns") or None
    vdp_table = _table(raw, "vdp")
    state_dir = path_of(state, "dir", "state.dir", False) or DEFAULT_STATE_DIR
    vdp = (parse_section(vdp_table, base, netns, (tls_files.ca, tls_files.cert, tls_files.key), state_dir)
           if vdp_table else None)
    return AgentConfig(
        device_id=device_id, device_type=device_type, kinds=kinds, tls=tls_files,
        address=address, port=port, netns=netns,
        metrics=metrics, allowed_peers=frozenset(str(p) for p in peers),
        max_bundle_bytes=max_bytes,
        state_dir=state_dir,
        bundle_key_file=path_of(state, "bundle_key_file", "state.bundle_key_file", False),
        counter_interfaces=tuple(str(i) for i in interfaces), counter_max_keys=max_keys,
        dhcp_trusted=trusted, dhcp_untrusted=tuple(str(i) for i in untrusted),
        dhcp_max_bindings=max_bindings,
        manager=_upstream(_table(raw, "manager"), device_id), vdp=vdp,
        connection_limits=limits_from(limits, "agent config: limits"),
        privsep_user=_str(_table(raw, "privsep"), "privsep.user", key="user") or None,
        **_precopy(_table(raw, "precopy")),
    )


def _precopy(table: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(table) - {"events_trusted", "expire_s"})
    if unknown:
        raise UsageError(f"agent config: unknown key(s) in [precopy]: {', '.join(unknown)}")
    trusted = table.get("events_trusted", False)
    expire = table.get("expire_s", 600.0)
    if not isinstance(trusted, bool):
        raise UsageError("agent config: precopy.events_trusted must be true or false")
    if not isinstance(expire, int | float) or isinstance(expire, bool) or expire <= 0:
        raise UsageError("agent config: precopy.expire_s must be a positive number of seconds")
    return {"precopy_events_trusted": trusted, "precopy_expire_s": float(expire)}


def _upstream(table: Mapping[str, Any], device_id: str) -> UpstreamConfig | None:
    """The [manager] section: all of url, group and interface, or none of them."""
    if not table:
        return None
    unknown = sorted(set(table) - {"url", "group", "interface", "device"})
    if unknown:
        raise UsageError(f"agent config: unknown key(s) in [manager]: {', '.join(unknown)}")
    try:
        # Several managers sharing an etcd journal: comma-separated, the leader is found.
        url = ",".join(check_agent_url(u.strip())
                       for u in _str(table, "manager.url", required=True, key="url").split(",") if u.strip())
    except UsageError as exc:
        raise UsageError(f"agent config: manager.url: {exc}") from None
    group = addr.hostport(_str(table, "manager.group", required=True, key="group"),
                          "agent config: manager.group")
    if ipaddress.ip_address(group[0]).version != 4 or not ipaddress.ip_address(group[0]).is_multicast:
        raise UsageError(f"agent config: manager.group {group[0]!r} is not an IPv4 multicast address")
    interface = _str(table, "manager.interface", required=True, key="interface")
    addr.check_ip(interface, "agent config: manager.interface")
    return UpstreamConfig(url, group, interface, _str(table, "manager.device", key="device") or device_id)


def _table(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise UsageError(f"agent config: [{name}] must be a table")
    return value


def _str(table: Mapping[str, Any], name: str, required: bool = False, key: str | None = None) -> str:
    key = key or name.rsplit(".", 1)[-1]
    value = table.get(key)
    if value is None or value == "":
        if required:
            raise UsageError(f"agent config: {name} is required")
        return ""
    if not isinstance(value, str):
        raise UsageError(f"agent config: {name} must be a string")
    return value
