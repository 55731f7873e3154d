"""Per-VM counters: keys, values, ownership, bundle encoding. Pure logic, no kernel.

A *table* maps a 24-byte key (``struct xfer_ctr_key`` of ``xfer_maps.h``: MAC,
family, pad, address) to a tuple of the six counts of ``struct xfer_ctr_val``
(``FIELDS``). *Columns* hold the same entries as two byte blocks, keys then
values, exactly as batch map syscalls take and give them: the transfer path moves
columns so that 10,000 VMs cost a few copies rather than a Python object per
count. This module decides which entries belong to a VM (``Selection``), adds
entries together and turns them into a bundle section and back. Blocks of
``BULK`` keys or more are matched with numpy (``xfer.counters.keyjoin``); smaller
ones in plain Python, so a one-VM move never imports numpy.

    >>> k = make_key("02:00:00:00:00:02", "10.0.0.2")
    >>> split_key(k)
    ('02:00:00:00:00:02', '10.0.0.2')
    >>> add({k: (1, 98, 1, 98, 0, 0)}, {k: (1, 98, 0, 0, 1, 0)})[k]
    (2, 196, 1, 98, 1, 0)
"""

from __future__ import annotations

import ipaddress
import operator
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from xfer.bundle import Section
from xfer.errors import BundleError, ForeignEntryError, UsageError
from xfer.model import Kind, VmIdentity

if TYPE_CHECKING:
    from xfer.counters.keyjoin import KeyIndex

FIELDS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tcp_initiated", "tcp_accepted")
FAMILY_IPV4, FAMILY_IPV6 = 4, 6
KEY = struct.Struct("=6sBx16s")          # struct xfer_ctr_key
VALUE = struct.Struct("=6Q")             # struct xfer_ctr_val, host byte order as in the map
_KEY_BYTES = struct.Struct(f"{KEY.size}s")
_first = operator.itemgetter(0)
_WRAP = (1 << 64) - 1  # counts are u64 in the kernel: sums wrap there, and so here
ENCODING = "xfer-counters/1"            # payload: n keys, then n values as little-endian u64s
MAX_RECORDS = 1_000_000
ZERO = (0,) * len(FIELDS)
# Up to this many keys one lookup per key beats a batch dump of the whole map.
LOOKUP_LIMIT = 64
# Up to this many (MAC, IP) pairs a VM's keys are enumerated into a set; beyond, a predicate.
KEYSET_LIMIT = 4096
# From this many keys a block is matched with numpy: its ~50 ms import is paid back
# (at 20,000 keys Python sets cost ~3 ms a pass, numpy ~0.5 ms).
BULK = 512

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


def vm_keys(vm: VmIdentity, limit: int = LOOKUP_LIMIT) -> list[bytes] | None:
    """Every key the VM can have, or None when its MAC is unknown or the keys exceed
    ``limit`` (then a scan of the table is cheaper than a lookup per key)."""
    if not vm.macs or not vm.addresses or len(vm.macs) * len(vm.addresses) > limit:
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
        mac, family, addr = KEY.unpack(key)
        if family == FAMILY_IPV4:
            if addr[4:] != bytes(12):
                return False
            addr = addr[:4]
        elif family != FAMILY_IPV6:
            return False
        return (not macs or mac in macs) and (not ips or addr in ips)

    return test


@dataclass(frozen=True)
class Selection:
    """Which keys an export, import or forget covers.

    ``keys``: the keys themselves when few enough to look up one by one, else None
    (scan the map); ``keyset``: every key, when they are enumerable (fast set
    operations); ``test``: membership, for scans and for validating a bundle.
    """

    keys: tuple[bytes, ...] | None
    keyset: frozenset[bytes] | None
    test: Callable[[bytes], bool]

    @cached_property
    def index(self) -> KeyIndex:
        """The key set as a numpy index (bulk matching); needs ``keyset``."""
        from xfer.counters.keyjoin import KeyIndex

        if self.keyset is None:
            raise ValueError("a selection by predicate has no key index")
        return KeyIndex(b"".join(sorted(self.keyset)))


def selection(vm: VmIdentity) -> Selection:
    """The keys of one VM.

    >>> len(selection(VmIdentity("v", ("02:00:00:00:00:02",), ("10.0.0.2",))).keys)
    1
    """
    return fleet_selection([vm])


def fleet_selection(vms: Iterable[VmIdentity]) -> Selection:
    """The keys of several VMs (bulk moves): a set of their (MAC, IP) pairs.

    A VM named without a MAC (or with too many pairs) is matched by a predicate instead.
    """
    keys: set[bytes] = set()
    tests: list[Callable[[bytes], bool]] = []
    for vm in vms:
        mine = vm_keys(vm, KEYSET_LIMIT)
        if mine is None:
            tests.append(owner(vm))
        else:
            keys.update(mine)
    frozen = frozenset(keys)
    if not tests:
        few = tuple(sorted(frozen)) if len(frozen) <= LOOKUP_LIMIT else None
        return Selection(few, frozen, frozen.__contains__)

    def test(key: bytes) -> bool:
        return key in frozen or any(t(key) for t in tests)

    return Selection(None, None, test)


# --- tables (for people: show, sums) -------------------------------------------------------

def add(*tables: Mapping[bytes, Counts]) -> Table:
    """Sum tables key by key (modulo 2**64, as the kernel's counters)."""
    out: Table = {}
    for table in tables:
        for key, counts in table.items():
            have = out.get(key)
            if have is not None:
                counts = _sum(have, counts)
            out[key] = counts
    return out


def _sum(a: Counts, b: Counts) -> Counts:
    return tuple((x + y) & _WRAP for x, y in zip(a, b, strict=True))


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


# --- columns (for the transfer path) ---------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Entries as a block of keys and a block of values (host order, as the map holds them)."""

    keys: bytes = b""
    values: bytes = b""

    def __post_init__(self) -> None:
        n = len(self.keys) // KEY.size
        if len(self.keys) != n * KEY.size or len(self.values) != n * VALUE.size:
            raise BundleError("counters: keys and values do not pair up")

    def __len__(self) -> int:
        return len(self.keys) // KEY.size

    def key_list(self) -> list[bytes]:
        # map + itemgetter + iter_unpack keep the loop in C: twice as fast as slicing.
        return list(map(_first, _KEY_BYTES.iter_unpack(self.keys)))

    def table(self) -> Table:
        return from_raw(self.keys, self.values)

    @classmethod
    def of(cls, table: Mapping[bytes, Counts]) -> Columns:
        return cls(*to_raw(table))

    def select(self, sel: Selection) -> Columns:
        """The entries whose key ``sel`` covers (no copy when all are)."""
        return self._filter(sel, True)

    def exclude(self, sel: Selection) -> Columns:
        """The entries whose key ``sel`` does not cover (no copy when none is covered)."""
        return self._filter(sel, False)

    def _filter(self, sel: Selection, inside: bool) -> Columns:
        if not self.keys:
            return self
        if sel.keyset is not None and len(sel.keyset) <= LOOKUP_LIMIT:  # one VM: find its keys
            found = sorted(i for key in sel.keyset if (i := self.position(key)) >= 0)
            if not inside:
                return self.cut(found)
            return self if len(found) == len(self) else self.at(found)
        if sel.keyset is None or len(self) < BULK:  # a predicate, or too few keys for numpy
            keep = [i for i, k in enumerate(self.key_list()) if sel.test(k) == inside]
            return self if len(keep) == len(self) else self.at(keep)
        from xfer.counters import keyjoin

        mask = (sel.index.find(self.keys) >= 0) == inside
        return self if bool(mask.all()) else Columns(*keyjoin.keep(self.keys, self.values, mask))

    def position(self, key: bytes) -> int:
        """Where ``key`` is, or -1 (a C-speed search of the block, ~5 ns a key)."""
        at = self.keys.find(key)
        while at >= 0 and at % KEY.size:  # a match across two keys: look further
            at = self.keys.find(key, at + 1)
        return at // KEY.size if at >= 0 else -1

    def cut(self, positions: list[int]) -> Columns:
        """Everything but the entries at these sorted positions (one slice per run kept)."""
        if not positions:
            return self
        ks, vs = KEY.size, VALUE.size
        runs, start = [], 0
        for cut in positions:
            if cut > start:
                runs.append((start, cut))
            start = cut + 1
        if start < len(self):
            runs.append((start, len(self)))
        return Columns(b"".join(self.keys[a * ks:b * ks] for a, b in runs),
                       b"".join(self.values[a * vs:b * vs] for a, b in runs))

    def at(self, positions: Iterable[int]) -> Columns:
        """The entries at these positions, in that order."""
        ks, vs = KEY.size, VALUE.size
        positions = list(positions)
        return Columns(b"".join(self.keys[i * ks:(i + 1) * ks] for i in positions),
                       b"".join(self.values[i * vs:(i + 1) * vs] for i in positions))


def add_columns(*parts: Columns) -> Columns:
    """Sum entries key by key; the common case (at most one part non-empty) copies nothing.

    Each part holds a key at most once (as every map and checked section does).
    """
    out = Columns()
    for part in parts:
        out = merge(out, part)[0]
    return out


def merge(a: Columns, b: Columns) -> tuple[Columns, int]:
    """``a`` + ``b`` key by key, and how many keys both held (each holds a key once).

    A few keys are found in the other block by scanning it; many with numpy.
    """
    if not len(b) or not len(a):
        return (b if len(b) else a), 0
    small, big = (a, b) if len(a) <= len(b) else (b, a)
    if len(small) <= LOOKUP_LIMIT:
        return _patch(big, small)
    if len(big) < BULK:
        total = Columns.of(add(a.table(), b.table()))
        return total, len(a) + len(b) - len(total)
    from xfer.counters import keyjoin

    keys, values, both = keyjoin.merge(a.keys, a.values, b.keys, b.values)
    return Columns(keys, values), both


def _patch(big: Columns, small: Columns) -> tuple[Columns, int]:
    """Add a few entries into a large block: sums in place, new keys appended."""
    values = bytearray(big.values)
    new_keys, new_values = [], []
    vs = VALUE.size
    for i, key in enumerate(small.key_list()):
        at = big.position(key)
        if at < 0:
            new_keys.append(key)
            new_values.append(small.values[i * vs:(i + 1) * vs])
        else:
            VALUE.pack_into(values, at * vs, *_sum(VALUE.unpack_from(values, at * vs),
                                                   VALUE.unpack_from(small.values, i * vs)))
    both = len(small) - len(new_keys)
    return Columns(big.keys + b"".join(new_keys), bytes(values) + b"".join(new_values)), both


def _swap_to_le(values: bytes) -> bytes:
    """Host-order u64s to little-endian (and back: the swap is its own inverse)."""
    if sys.byteorder == "little":
        return values
    words = array("Q", values)
    words.byteswap()
    return words.tobytes()


# --- bundle section ----------------------------------------------------------------------

def pack_payload(cols: Columns) -> bytes:
    """The section payload: n keys, then n values as little-endian u64s (``FIELDS`` order)."""
    return cols.keys + _swap_to_le(cols.values)


def unpack_payload(payload: bytes, count: int, sel: Selection, vm_id: str) -> Columns:
    """Columns from a payload, every key checked against ``sel`` (ForeignEntryError if not)."""
    if count > MAX_RECORDS:
        raise BundleError(f"counters section holds {count} entries, over {MAX_RECORDS}")
    split = count * KEY.size
    if len(payload) != count * (KEY.size + VALUE.size):
        raise BundleError(f"counters section holds {len(payload)} bytes, not {count} entries "
                          f"of {KEY.size + VALUE.size}")
    cols = Columns(payload[:split], _swap_to_le(payload[split:]))
    foreign = _first_foreign(cols, sel)
    if foreign is not None:
        try:
            mac, ip = split_key(foreign)
        except BundleError:
            raise BundleError(f"counters section holds a malformed key {foreign.hex()}") from None
        raise ForeignEntryError(f"counters section holds {mac} {ip}, "
                                f"which is not an address of VM {vm_id}")
    return cols


def _first_foreign(cols: Columns, sel: Selection) -> bytes | None:
    """A key of ``cols`` that ``sel`` does not cover, or None; BundleError for a key held twice."""
    if sel.keyset is not None and len(cols) >= BULK:
        import numpy as np

        at = sel.index.find(cols.keys)
        found = at[at >= 0]
        # Two keys that found the same place in the key set are the same key.
        if len(found) and int(np.bincount(found).max()) > 1:
            raise BundleError("counters section holds a key twice")
        missing = np.flatnonzero(at < 0)
        return cols.at([int(missing[0])]).keys if len(missing) else None
    keys = cols.key_list()
    present = set(keys)
    if len(present) != len(keys):
        raise BundleError("counters section holds a key twice")
    if sel.keyset is not None and sel.keyset.issuperset(present):
        return None
    return next((k for k in keys if not sel.test(k)), None)


def encode_section(vm: VmIdentity, cols: Columns,
                   meta: Mapping[str, Any] | None = None) -> Section:
    """A bundle section holding ``cols``, naming the VM it belongs to."""
    return Section(Kind.COUNTERS, ENCODING, len(cols), pack_payload(cols),
                   {"vm": vm.to_dict(), "fields": list(FIELDS), **(meta or {})})


def decode_section(section: Section, vm: VmIdentity) -> Columns:
    """The entries of a section, checked to belong entirely to ``vm``.

    Raises BundleError for a malformed section and ForeignEntryError when the
    section names another VM or holds a key that is not ``vm``'s.
    """
    if section.encoding != ENCODING:
        raise BundleError(f"counters section encoding {section.encoding!r} is not {ENCODING!r}")
    named = section.meta.get("vm")
    try:
        named_vm = VmIdentity.from_dict(named) if isinstance(named, Mapping) else None
    except UsageError:
        named_vm = None
    if named_vm is None:
        raise BundleError("counters section does not name its VM")
    if not named_vm.same_vm(vm):
        raise ForeignEntryError(f"counters section is for VM {named_vm.id} "
                                f"({', '.join((*named_vm.addresses, *named_vm.macs))}), "
                                f"not for {vm.id}")
    fields = section.meta.get("fields", list(FIELDS))
    if not isinstance(fields, list) or fields != list(FIELDS):
        raise BundleError("counters section carries other fields than this xfer knows")
    return unpack_payload(section.payload, section.count, selection(vm), vm.id)
