"""Bindings as records, the arithmetic of leases, and who owns a binding. Pure logic.

The datapath keeps a lease as an absolute CLOCK_BOOTTIME deadline in
nanoseconds (what bpf_ktime_get_boot_ns() compares against); everywhere else a
lease is *remaining seconds*, because two devices' boot clocks have nothing in
common and wall clocks need not agree.

    >>> b = Binding("02:00:00:00:00:02", "10.0.0.2", 3600.0, "veth1")
    >>> key, value = b.to_datapath(now_ns=0, ifindex=7)
    >>> Binding.from_datapath(key, value, now_ns=10**9, ifname="veth1").lease_remaining
    3599.0
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from xfer.dhcp import abi
from xfer.errors import ForeignEntryError, UsageError
from xfer.model import VmIdentity, normalize_mac

NS = 1_000_000_000
SOURCES = {"dhcp": abi.FLAG_DHCP, "static": abi.FLAG_STATIC}


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


def mac_text(raw: bytes | Iterable[int]) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def ipv4_text(text: str) -> str:
    """Validate and normalize an IPv4 address (bindings are IPv4 only)."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise UsageError(f"not an IPv4 address: {text!r}") from None


@dataclass(frozen=True)
class Binding:
    """One binding: a client MAC may send from ``ip`` on ``port`` (and ``vlan``).

    ``lease_remaining`` is seconds left, ``None`` for a binding that never expires;
    ``port`` is the device's interface name, ``None`` for any untrusted port (the
    datapath pins it to the port of the VM's first packet).
    """

    mac: str
    ip: str
    lease_remaining: float | None
    port: str | None = None
    vlan: int = 0
    source: str = "dhcp"
    lease: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        object.__setattr__(self, "ip", ipv4_text(self.ip))
        if not 0 <= self.vlan <= 4094:
            raise UsageError(f"VLAN {self.vlan} is out of range 0..4094")
        if self.source not in SOURCES:
            raise UsageError(f"binding source {self.source!r} is not one of {sorted(SOURCES)}")
        if self.lease_remaining is not None and not math.isfinite(self.lease_remaining):
            raise UsageError("lease_remaining must be a finite number of seconds or null")

    @property
    def expired(self) -> bool:
        return self.lease_remaining is not None and self.lease_remaining <= 0

    def aged(self, seconds: float) -> Binding:
        """The same binding ``seconds`` later (a bundle in transit, a file on disk)."""
        if self.lease_remaining is None:
            return self
        return replace(self, lease_remaining=self.lease_remaining - max(0.0, seconds))

    def key(self) -> abi.BindingKey:
        k = abi.BindingKey()
        k.mac[:] = mac_bytes(self.mac)
        k.ip[:] = ipaddress.IPv4Address(self.ip).packed
        return k

    def to_datapath(self, now_ns: int, ifindex: int) -> tuple[abi.BindingKey, abi.BindingValue]:
        """Key and value for the map; ``now_ns`` is CLOCK_BOOTTIME, ``ifindex`` 0 for any port."""
        v = abi.BindingValue()
        if self.lease_remaining is not None:
            # never 0: that means "never expires" to the datapath
            v.expires_ns = max(1, now_ns + int(self.lease_remaining * NS))
        v.ifindex = ifindex
        v.lease_s = self.lease
        v.vlan = self.vlan
        v.flags = SOURCES[self.source]
        return self.key(), v

    @classmethod
    def from_datapath(cls, key: abi.BindingKey, value: abi.BindingValue, now_ns: int,
                      ifname: str | None) -> Binding:
        remaining = None if value.expires_ns == 0 else (value.expires_ns - now_ns) / NS
        source = "static" if value.flags & abi.FLAG_STATIC else "dhcp"
        return cls(mac_text(key.mac), str(ipaddress.IPv4Address(bytes(key.ip))),
                   None if remaining is None else round(remaining, 3), ifname, value.vlan,
                   source, value.lease_s)

    def to_json(self) -> dict[str, Any]:
        """The ``xfer dhcp bindings --json`` record (contract keys first)."""
        return {"mac": self.mac, "ip": self.ip, "lease_remaining": self.lease_remaining,
                "port": self.port, "vlan": self.vlan, "source": self.source, "lease": self.lease}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Binding:
        try:
            remaining = data["lease_remaining"]
            return cls(str(data["mac"]), str(data["ip"]),
                       None if remaining is None else float(remaining),
                       None if data.get("port") is None else str(data["port"]),
                       int(data.get("vlan", 0)), str(data.get("source", "dhcp")),
                       int(data.get("lease", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed binding {dict(data)!r}: {exc}") from None


def belongs(b: Binding, vm: VmIdentity) -> bool:
    """True when every address the binding names is the VM's, and at least one is named.

    A VM named only by IP cannot vouch for a MAC (and the reverse): the address
    family it does not name is not checked.

    >>> belongs(Binding("02:00:00:00:00:02", "10.0.0.2", 60), VmIdentity("v", ipv4=("10.0.0.2",)))
    True
    """
    if not vm.macs and not vm.ipv4:
        return False
    mac_ok = not vm.macs or b.mac in vm.macs   # both normalized (lower case, colons)
    ip_ok = not vm.ipv4 or b.ip in vm.ipv4
    return mac_ok and ip_ok


def check_owned(bindings: Iterable[Binding], vm: VmIdentity) -> list[Binding]:
    """All the bindings, or ForeignEntryError naming the first that is not the VM's."""
    out = list(bindings)
    for i, b in enumerate(out):
        if not belongs(b, vm):
            raise ForeignEntryError(
                f"dhcp binding {i} ({b.mac} {b.ip}) does not belong to VM {vm.id} "
                f"({', '.join((*vm.macs, *vm.ipv4))}); nothing imported")
    return out


def for_vm(bindings: Iterable[Binding], vm: VmIdentity) -> list[Binding]:
    """The VM's bindings: those whose MAC or IP is one of the VM's."""
    return [b for b in bindings if b.mac in vm.macs or b.ip in vm.ipv4]
