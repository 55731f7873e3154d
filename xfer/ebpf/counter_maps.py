"""The counters program's maps, one wrapper each, over ``bpfsys.BpfMap``.

ctypes mirrors of ``xfer_maps.h`` (checked against clang's layout by
tests/test_counters_layout.py) and three wrappers:

* ``LiveCounters``  ``xfer_ctr``: what the datapath counted. User space only reads
  and deletes (forget); it never writes a value the datapath increments.
* ``CarriedCounters`` ``xfer_ctr_base``: counts brought in by imports. Only user space
  writes it, so read-add-write cannot race a packet.
* ``ImportedBundles`` ``xfer_ctr_imported``: ids of bundles already imported.

Every bulk operation takes ``batch=`` (default True) so benchmarks and old kernels
can use the per-key path; ``BpfMap`` also falls back by itself when the kernel
refuses a batch.

    with CounterMaps.open(pin_dir("eth1", "fw-src")) as maps:
        total = counters.add_columns(maps.live.read_columns(), maps.carried.read_columns())
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from xfer.ebpf import counters
from xfer.ebpf.bpfsys import NOEXIST, BpfMap
from xfer.errors import BPFLoadError, KernelError

LIVE, CARRIED, IMPORTED = "xfer_ctr", "xfer_ctr_base", "xfer_ctr_imported"
MAP_NAMES = (LIVE, CARRIED, IMPORTED)


class CounterKey(ctypes.Structure):
    """``struct xfer_ctr_key``."""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("addr", ctypes.c_uint8 * 16)]


class CounterValue(ctypes.Structure):
    """``struct xfer_ctr_val``."""

    _fields_ = [(name, ctypes.c_uint64) for name in counters.FIELDS]


class BundleId(ctypes.Structure):
    """``struct xfer_bundle_id``."""

    _fields_ = [("id", ctypes.c_uint8 * 16)]


def _checked(m: BpfMap, key: type[ctypes.Structure], value: type[ctypes._SimpleCData] |
             type[ctypes.Structure]) -> BpfMap:
    # A map pinned by an older build with another layout must not be misread.
    if (m.key_size, m.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
        raise BPFLoadError(f"pinned map {m.name} has key/value sizes {m.key_size}/"
                           f"{m.value_size}, this xfer expects {ctypes.sizeof(key)}/"
                           f"{ctypes.sizeof(value)}: detach, remove the pins, attach again")
    return m


class CounterTable:
    """Reads shared by both counter maps."""

    def __init__(self, m: BpfMap) -> None:
        self.map = _checked(m, CounterKey, CounterValue)

    def read_columns(self, batch: bool = True) -> counters.Columns:
        """Every entry (one batch syscall, or a per-key walk with ``batch=False``)."""
        keys, values, _ = self.map.dump(batch)
        return counters.Columns(keys, values)

    def read_keys(self, keys: Sequence[bytes]) -> counters.Columns:
        """The entries of ``keys`` that exist (one lookup each: cheap for one VM)."""
        got = self.map.lookup_many(list(keys))
        return counters.Columns(b"".join(got), b"".join(got.values()))

    def delete(self, keys: Sequence[bytes], batch: bool = True) -> int:
        return self.map.delete_many(list(keys), batch)


class LiveCounters(CounterTable):
    """``xfer_ctr``: read and delete only."""


class CarriedCounters(CounterTable):
    """``xfer_ctr_base``: the counts imports carried in."""

    def write(self, cols: counters.Columns, batch: bool = True) -> None:
        """Store these entries (replacing their values)."""
        self.map.update_many(cols.keys, cols.values, batch)


class ImportedBundles:
    """``xfer_ctr_imported``: which bundle ids were already added here."""

    def __init__(self, m: BpfMap) -> None:
        self.map = _checked(m, BundleId, ctypes.c_uint64)

    @staticmethod
    def key(bundle_id: str) -> bytes:
        """16 bytes for a bundle id (uuid hex as is, anything else hashed)."""
        try:
            raw = bytes.fromhex(bundle_id)
        except ValueError:
            raw = b""
        return raw if len(raw) == 16 else hashlib.sha256(bundle_id.encode()).digest()[:16]

    def seen(self, bundle_id: str) -> bool:
        return self.map.lookup(self.key(bundle_id)) is not None

    def record(self, bundle_id: str) -> bool:
        """Record an import; False when the id was already there (another import won)."""
        value = time.time_ns().to_bytes(8, "little")
        try:
            self.map.update(self.key(bundle_id), value, NOEXIST)
        except KernelError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True


@dataclass
class CounterMaps:
    """The three maps of one interface, opened from their pins."""

    live: LiveCounters
    carried: CarriedCounters
    imported: ImportedBundles
    pins: Path

    @classmethod
    def open(cls, pins: Path) -> CounterMaps:
        """Open the maps pinned in ``pins``; BPFLoadError when the program never ran there."""
        opened: list[BpfMap] = []
        try:
            for name in MAP_NAMES:
                opened.append(BpfMap.open_pinned(str(pins / name)))
            return cls(LiveCounters(opened[0]), CarriedCounters(opened[1]),
                       ImportedBundles(opened[2]), pins)
        except BaseException:
            for m in opened:
                m.close()
            raise

    def close(self) -> None:
        for m in (self.live.map, self.carried.map, self.imported.map):
            m.close()

    def __enter__(self) -> CounterMaps:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
