"""What a VDP responder needs: ports, the server they face, where messages go.

From the command line (``xfer vdp serve``) or the agent's ``[vdp]`` section::

    [vdp]
    ports = ["p1", "p2"]            # the switch's host-facing ports (in device.netns)
    server = "hv7"                  # the server behind them, as the manager's topology names it
    manager = "https://10.0.4.9:8700/v1/migrations"   # mutual TLS with the agent's [tls] files
    # udp = "239.7.7.7:8702"        # or: one datagram per message (then no manager URL)
    # interface = "10.0.4.1"        # with udp: the address datagrams leave from
    # inventory = "/etc/xfer/inventory.toml"
    # sequence_file = "/var/lib/xfer/vdp.seq"   # default in an agent: [state] dir / vdp.seq
    # timeout = 10.0                # seconds to wait for the manager's answer

    cfg = parse_section(raw["vdp"], base=Path("/etc/xfer"), netns="sw1", tls=(ca, cert, key))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfer.errors import UsageError
from xfer.net import address

_IFNAME = re.compile(r"[^\s/:]{1,15}")
DEFAULT_TIMEOUT_S = 10.0
KEYS = {"ports", "server", "manager", "udp", "interface", "inventory", "sequence_file", "timeout"}


@dataclass(frozen=True)
class VdpConfig:
    """One responder: exactly one of ``manager`` (URL) and ``udp`` (host, port) is set.

    >>> VdpConfig(None, ("p1",), "hv7", udp=("127.0.0.1", 8702)).udp
    ('127.0.0.1', 8702)
    """

    netns: str | None
    ports: tuple[str, ...]
    server: str
    manager: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    udp: tuple[str, int] | None = None
    interface: str | None = None
    inventory: Path | None = None
    sequence_file: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.ports:
            raise UsageError("vdp: name at least one port")
        for port in self.ports:
            if not _IFNAME.fullmatch(port):
                raise UsageError(f"vdp: {port!r} is not an interface name")
        if len(set(self.ports)) != len(self.ports):
            raise UsageError("vdp: a port is named twice")
        if not self.server:
            raise UsageError("vdp: the server behind the ports must be named")
        if (self.manager is None) == (self.udp is None):
            raise UsageError("vdp: give either a manager URL or a UDP address, not both or neither")
        if self.manager and self.manager.startswith("https:") and (self.ca is None or self.cert is None):
            raise UsageError("vdp: an https manager needs --ca, --cert and --key (mutual TLS)")
        if not 0 < self.timeout_s <= 60:
            raise UsageError("vdp: timeout must be within (0, 60] seconds")


def parse_ports(text: str) -> tuple[str, ...]:
    """``"p1,p2"`` -> ``("p1", "p2")``."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_hostport(text: str, name: str = "--udp") -> tuple[str, int]:
    """``"239.7.7.7:8702"`` -> ``("239.7.7.7", 8702)``; ``[v6]:port`` too."""
    return address.hostport(text, name)


def parse_section(table: Mapping[str, Any], base: Path, netns: str | None,
                  tls: tuple[Path, Path, Path] | None = None, state_dir: Path | None = None) -> VdpConfig:
    """The agent's ``[vdp]`` section; relative paths from ``base``, TLS from the agent's files,
    the sequence file in the agent's ``state_dir`` unless named."""
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise UsageError(f"agent config: unknown key(s) in [vdp]: {', '.join(unknown)}")
    ports = table.get("ports")
    if not isinstance(ports, list) or not all(isinstance(p, str) for p in ports):
        raise UsageError("agent config: vdp.ports must be a list of interface names")

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"agent config: vdp.{key} must be a string")
        return value or None

    def path(key: str) -> Path | None:
        value = text(key)
        return base / value if value else None

    timeout = table.get("timeout", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise UsageError("agent config: vdp.timeout must be a number of seconds")
    udp = text("udp")
    ca, cert, key = tls if tls else (None, None, None)
    return VdpConfig(netns, tuple(ports), text("server") or "", manager=text("manager"),
                     ca=ca, cert=cert, key=key, udp=parse_hostport(udp, "vdp.udp") if udp else None,
                     interface=text("interface"), inventory=path("inventory"),
                     sequence_file=path("sequence_file") or (state_dir / "vdp.seq" if state_dir else None),
                     timeout_s=float(timeout))
