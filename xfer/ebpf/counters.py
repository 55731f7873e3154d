"""Per-VM counters: keys, values, ownership, bundle encoding. Pure logic, no kernel.

A *table* maps a 24-byte key (``struct xfer_ctr_key`` of ``xfer_maps.h``: MAC,
family, pad, address) to a tuple of the six counts of ``struct xfer_ctr_val``
(``FIELDS``). The kernel side (``counter_maps``) reads and writes tables; this
module decides which entries belong to a VM, adds tables together and turns
them into a bundle section and back.

    >>> k = make_key("02:00:00:00:00:02", "10.0.0.2")
    >>> split_key(k)
    ('02:00:00:00:00:02', '10.0.0.2')
    >>> add({k: (1, 98, 1, 98, 0, 0)}, {k: (1, 98, 0, 0, 1, 0)})[k]
    (2, 196, 1, 98, 1, 0)
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Mapping
from typing import Any

from xfer.bundle import Section
from xfer.errors import BundleError, ForeignEntryError
from xfer.model import Kind, VmIdentity

FIELDS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tcp_initiated", "tcp_accepted")
FAMILY_IPV4, FAMILY_IPV6 = 4, 6
KEY = struct.Struct("=6sBx16s")          # struct xfer_ctr_key
VALUE = struct.Struct("=6Q")             # struct xfer_ctr_val, host byte order as in the map
RECORD = struct.Struct("<24s6Q")         # one bundle record: key bytes + little-endian counts
ENCODING = "xfer-counters/1"
MAX_RECORDS = 1_000_000
ZERO = (0,) * len(FIELDS)

Counts = tuple[int, ...]
Table = dict[bytes, Counts]


# --- keys --------------------------------------------------------------------------------

def make_key(mac: str, ip: str) -> bytes:
    """The map key of a (MAC, IP) pair."""
    addr = ipaddress.ip_address(ip)
    family = FAMILY_IPV4 if addr.version == 4 else FAMILY_IPV6
    return KEY.pack(bytes.fromhex(mac.replace(":", "").replace("-", "")), family, addr.packed)


def split_key(key: bytes) -> tuple[str, str]:
    """``(mac, ip)`` as text from a map key; BundleError when the key is malformed."""
    mac, family, addr = KEY.unpack(key)
    if family == FAMILY_IPV4 and addr[4:] == bytes(12):
        ip = str(ipaddress.IPv4Address(addr[:4]))
    elif family == FAMILY_IPV6:
        ip = ipaddress.IPv6Address(addr).compressed
    else:
        raise BundleError(f"malformed counters key {key.hex()}")
    return ":".join(f"{b:02x}" for b in mac), ip


def _key_parts(key: bytes) -> tuple[bytes, bytes]:
    """(MAC bytes, packed IP) as VmIdentity compares them."""
    mac, family, addr = KEY.unpack(key)
    return mac, addr[:4] if family == FAMILY_IPV4 else addr


def vm_keys(vm: VmIdentity) -> list[bytes] | None:
    """Every key the VM can have, or None when its MAC is unknown (then scan the table)."""
    if not vm.macs or not vm.addresses:
        return None
    return [make_key(mac, ip) for mac in vm.macs for ip in vm.addresses]


def belongs(key: bytes, vm: VmIdentity) -> bool:
    """True when the key is the VM's: its MAC (if the VM names MACs) and its IP (if it names IPs).

    >>> belongs(make_key("02:00:00:00:00:02", "10.0.0.2"), VmIdentity("v", ("02:00:00:00:00:02",)))
    True
    """
    return owner(vm)(key)


def owner(vm: VmIdentity) -> Callable[[bytes], bool]:
    """``belongs`` for one VM with its address sets built once (for scans of large tables)."""
    macs = {bytes.fromhex(m.replace(":", "")) for m in vm.macs}
    ips = vm.packed_addresses

    def test(key: bytes) -> bool:
        mac, ip = _key_parts(key)
        return (not macs or mac in macs) and (not ips or ip in ips)

    return test


# --- tables ------------------------------------------------------------------------------

def add(*tables: Mapping[bytes, Counts]) -> Table:
    """Sum tables key by key."""
    out: Table = {}
    for table in tables:
        for key, counts in table.items():
            have = out.get(key)
            if have is not None:
                counts = tuple(a + b for a, b in zip(have, counts, strict=True))
            out[key] = counts
    return out


def select(table: Mapping[bytes, Counts], vm: VmIdentity | None) -> Table:
    """The entries of ``table`` that belong to ``vm`` (all of them for None)."""
    if vm is None:
        return dict(table)
    mine = owner(vm)
    return {k: v for k, v in table.items() if mine(k)}


def rows(table: Mapping[bytes, Counts]) -> list[dict[str, Any]]:
    """The ``xfer counters show --json`` contract: one dict per (MAC, IP), sorted."""
    out = []
    for key in sorted(table, key=_order):
        mac, ip = split_key(key)
        out.append({"mac": mac, "ip": ip, **dict(zip(FIELDS, table[key], strict=True))})
    return out


def _order(key: bytes) -> tuple[bytes, int, bytes]:
    mac, family, addr = KEY.unpack(key)
    return mac, family, addr


def from_raw(keys: bytes, values: bytes) -> Table:
    """A table from concatenated map keys and values (as ``BpfMap.dump`` returns them)."""
    ks = KEY.size
    split = (keys[i:i + ks] for i in range(0, len(keys), ks))
    return dict(zip(split, VALUE.iter_unpack(values), strict=True))


def to_raw(table: Mapping[bytes, Counts]) -> tuple[bytes, bytes]:
    """Concatenated keys and values for a batch update."""
    return b"".join(table), b"".join(VALUE.pack(*v) for v in table.values())


# --- bundle section ----------------------------------------------------------------------

def encode_section(vm: VmIdentity, table: Mapping[bytes, Counts],
                   meta: Mapping[str, Any] | None = None) -> Section:
    """A bundle section holding ``table``, naming the VM it belongs to."""
    payload = b"".join(RECORD.pack(k, *v) for k, v in table.items())
    return Section(Kind.COUNTERS, ENCODING, len(table), payload,
                   {"vm": vm.to_dict(), "fields": list(FIELDS), **(meta or {})})


def decode_section(section: Section, vm: VmIdentity) -> Table:
    """The table of a section, checked to belong entirely to ``vm``.

    Raises BundleError for a malformed section and ForeignEntryError when the
    section names another VM or holds a key that is not ``vm``'s.
    """
    if section.encoding != ENCODING:
        raise BundleError(f"counters section encoding {section.encoding!r} is not {ENCODING!r}")
    named = section.meta.get("vm")
    try:
        named_vm = VmIdentity.from_dict(named) if isinstance(named, Mapping) else None
    except Exception:
        named_vm = None
    if named_vm is None:
        raise BundleError("counters section does not name its VM")
    if not named_vm.same_vm(vm):
        raise ForeignEntryError(f"counters section is for VM {named_vm.id} "
                                f"({', '.join((*named_vm.addresses, *named_vm.macs))}), "
                                f"not for {vm.id}")
    size = len(section.payload)
    if size % RECORD.size or size // RECORD.size != section.count:
        raise BundleError(f"counters section holds {size} bytes, not {section.count} records "
                          f"of {RECORD.size}")
    if section.count > MAX_RECORDS:
        raise BundleError(f"counters section holds {section.count} records, over {MAX_RECORDS}")
    table: Table = {}
    mine = owner(vm)
    for key, *counts in RECORD.iter_unpack(section.payload):
        split_key(key)  # malformed keys are refused before anything changes
        if not mine(key):
            mac, ip = split_key(key)
            raise ForeignEntryError(f"counters section holds {mac} {ip}, "
                                    f"which is not an address of VM {vm.id}")
        if key in table:
            raise BundleError(f"counters section holds {split_key(key)} twice")
        table[key] = tuple(counts)
    return table

