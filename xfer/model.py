"""VM identity and the kinds of state xfer moves.

A VM is named on the command line by its addresses (``10.0.0.2,02:00:00:00:00:02``)
or by a name from the inventory file (TOML, ``$XFER_INVENTORY`` or
``/etc/xfer/inventory.toml``)::

    [vm.web1]
    mac = "02:00:00:00:00:02"
    ipv4 = ["10.0.0.2"]
    ipv6 = ["fd00::2"]

State belongs to a VM when one of its addresses appears in it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from xfer import tomlfile
from xfer.errors import UsageError

DEFAULT_INVENTORY = Path("/etc/xfer/inventory.toml")
# Bounds on a VM identity read from another device: a VM may be named by its addresses
# (a bulk test moves one with 600), so its id is as long as that list.
MAX_ADDRESSES = 4096  # of each family, and MACs
MAX_ID = 65536
# What a stateful network device can be (agent config device.type, topology devices).
DEVICE_TYPES = ("firewall", "router", "switch", "load-balancer")
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


class Kind(StrEnum):
    """A kind of dynamic state."""

    CONNTRACK = "conntrack"
    DHCP = "dhcp"
    COUNTERS = "counters"
    RULES = "rules"


def parse_kinds(spec: str | Iterable[str] | None) -> tuple[Kind, ...]:
    """``"conntrack,dhcp"`` → ``(Kind.CONNTRACK, Kind.DHCP)``; ``None`` → conntrack only.

    >>> parse_kinds("dhcp,conntrack")
    (<Kind.CONNTRACK: 'conntrack'>, <Kind.DHCP: 'dhcp'>)
    """
    if spec is None:
        return (Kind.CONNTRACK,)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    kinds: set[Kind] = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            kinds.add(Kind(name))
        except ValueError:
            valid = ", ".join(k.value for k in Kind)
            raise UsageError(f"unknown kind {name!r} (valid: {valid})") from None
    if not kinds:
        raise UsageError("no kind given")
    return tuple(k for k in Kind if k in kinds)


def normalize_mac(text: str) -> str:
    """``"02-00-00-AA-bb-01"`` → ``"02:00:00:aa:bb:01"``."""
    mac = text.strip().lower()
    if not _MAC_RE.match(mac):
        raise UsageError(f"not a MAC address: {text!r}")
    return mac.replace("-", ":")


@dataclass(frozen=True)
class VmIdentity:
    """A VM as the devices see it: an id, its MACs and its IP addresses."""

    id: str
    macs: tuple[str, ...] = ()
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    _packed: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        packed = frozenset(ipaddress.ip_address(a).packed for a in (*self.ipv4, *self.ipv6))
        object.__setattr__(self, "_packed", packed)

    @property
    def addresses(self) -> tuple[str, ...]:
        """All IP addresses, IPv4 first."""
        return (*self.ipv4, *self.ipv6)

    @property
    def packed_addresses(self) -> frozenset[bytes]:
        """The IP addresses in network byte order (4 or 16 bytes), for fast membership."""
        return self._packed

    def owns_ip(self, addr: bytes | str) -> bool:
        """True when ``addr`` (packed bytes or text) is one of the VM's IP addresses."""
        if isinstance(addr, str):
            addr = ipaddress.ip_address(addr).packed
        return addr in self._packed

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "macs": list(self.macs), "ipv4": list(self.ipv4),
                "ipv6": list(self.ipv6)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmIdentity:
        """The identity ``to_dict`` wrote; UsageError names the first field that is wrong
        (it may come from another device: every field is checked for its type)."""
        if not isinstance(data, Mapping):
            raise UsageError("malformed VM identity: not an object")
        vm_id = data.get("id")
        if not isinstance(vm_id, str) or not 0 < len(vm_id) <= MAX_ID:
            raise UsageError(f"malformed VM identity: id must be a string of 1 to {MAX_ID} characters")
        tokens: list[str] = []
        for key, version in (("macs", 0), ("ipv4", 4), ("ipv6", 6)):
            values = data.get(key, [])
            if (not isinstance(values, list) or len(values) > MAX_ADDRESSES
                    or not all(isinstance(v, str) and len(v) <= 64 for v in values)):
                raise UsageError(f"malformed VM identity: {key} must be a list of at most "
                                 f"{MAX_ADDRESSES} addresses")
            if version and any(_ip_version(v) != version for v in values):
                raise UsageError(f"malformed VM identity: {key} holds an address that is not IPv{version}")
            tokens += values
        return make_identity(vm_id, tokens)

    def same_vm(self, other: VmIdentity) -> bool:
        """True when both name the same addresses (ids may differ: one may be an inventory name)."""
        return (set(self.macs), self._packed) == (set(other.macs), other._packed)


def _ip_version(text: str) -> int:
    try:
        return ipaddress.ip_address(text.strip()).version
    except ValueError:
        return 0


def make_identity(vm_id: str, tokens: Iterable[str]) -> VmIdentity:
    """A VM named ``vm_id`` from its address tokens (IPv4, IPv6, MAC); UsageError on a bad one.

    >>> make_identity("vm1", ["10.0.0.2", "02:00:00:00:00:02"]).addresses
    ('10.0.0.2',)
    """
    macs: list[str] = []
    v4: list[str] = []
    v6: list[str] = []
    for token in tokens:
        token = token.strip()
        if not token:
            continue
        try:
            ip = ipaddress.ip_address(token)
        except ValueError:
            macs.append(normalize_mac(token))
            continue
        (v4 if ip.version == 4 else v6).append(ip.compressed)
    return VmIdentity(vm_id, tuple(dict.fromkeys(macs)), tuple(dict.fromkeys(v4)),
                      tuple(dict.fromkeys(v6)))


def load_inventory(path: Path | None = None) -> dict[str, VmIdentity]:
    """Read the VM inventory; a missing default file is an empty inventory."""
    explicit = path is not None or "XFER_INVENTORY" in os.environ
    path = path or Path(os.environ.get("XFER_INVENTORY", DEFAULT_INVENTORY))
    if not explicit and not path.exists():
        return {}
    raw = tomlfile.read(path, "inventory")
    inventory: dict[str, VmIdentity] = {}
    for name, entry in raw.get("vm", {}).items():
        tokens = [*_as_list(entry.get("mac")), *_as_list(entry.get("ipv4")),
                  *_as_list(entry.get("ipv6"))]
        inventory[name] = make_identity(name, tokens)
    return inventory


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def parse_vm(spec: str, inventory: Mapping[str, VmIdentity] | None = None) -> VmIdentity:
    """Turn ``--vm`` text into a VM identity.

    ``spec`` is a comma-separated list of IPv4/IPv6/MAC addresses, or one inventory name.

    >>> parse_vm("10.0.0.2,fd00::2").addresses
    ('10.0.0.2', 'fd00::2')
    """
    spec = spec.strip()
    if not spec:
        raise UsageError("--vm is empty")
    inv = load_inventory() if inventory is None else inventory
    if spec in inv:
        return inv[spec]
    try:
        vm = make_identity(spec, spec.split(","))
    except UsageError:
        raise UsageError(
            f"--vm {spec!r} is neither a list of IPv4/IPv6/MAC addresses nor a VM of the inventory"
        ) from None
    if not vm.addresses and not vm.macs:
        raise UsageError(f"--vm {spec!r} names no address")
    return vm


@dataclass
class KindReport:
    """What an import (or forget) did with one kind of state."""

    kind: Kind
    created: int = 0
    updated: int = 0
    skipped: int = 0
    failed: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rolled_back: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "updated": self.updated, "skipped": self.skipped,
                "failed": self.failed, "deleted": self.deleted,
                "errors": self.errors[:50], "warnings": self.warnings,
                "rolled_back": self.rolled_back, "seconds": round(self.seconds, 6)}
