"""The counters program's maps, one wrapper each, over ``bpfsys.BpfMap``.

ctypes mirrors of ``xfer_maps.h`` (checked against clang's layout by
tests/test_counters_layout.py) and three wrappers:

* ``LiveCounters``  ``xfer_ctr``: what the datapath counted. User space only reads
  and deletes (forget); it never writes a value the datapath increments.
* ``CarriedCounters`` ``xfer_ctr_carried`` + ``xfer_ctr_pages``: the table of counts
  brought in by imports, double-buffered in pages (see ``xfer_maps.h``). Only user
  space writes it, so read-add-write cannot race a packet.
* ``ImportedBundles`` ``xfer_ctr_imported``: ids of bundles already imported.

Every bulk operation takes ``batch=`` (default True) so benchmarks and old kernels
can use the per-key (per-page) path; ``BpfMap`` also falls back by itself when
the kernel refuses a batch.

    with CounterMaps.open(pin_dir("eth1", "fw-src")) as maps:
        total = counters.add_columns(maps.live.read_columns(), maps.carried.read())
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

from xfer.counters import model as counters
from xfer.ebpf.bpfsys import NOEXIST, BpfMap
from xfer.errors import BPFLoadError, KernelError

LIVE, CARRIED, PAGES, IMPORTED = "xfer_ctr", "xfer_ctr_carried", "xfer_ctr_pages", "xfer_ctr_imported"
MAP_NAMES = (LIVE, CARRIED, PAGES, IMPORTED)
PAGE = 65536          # XFER_CARRIED_PAGE
CARRIED_VERSION = 1   # XFER_CARRIED_VERSION


class CounterKey(ctypes.Structure):
    """``struct xfer_ctr_key``."""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("addr", ctypes.c_uint8 * 16)]


class CounterValue(ctypes.Structure):
    """``struct xfer_ctr_val``."""

    _fields_ = [(name, ctypes.c_uint64) for name in counters.FIELDS]


class CarriedHeader(ctypes.Structure):
    """``struct xfer_ctr_carried``."""

    _fields_ = [("generation", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("version", ctypes.c_uint32)]


class CarriedPage(ctypes.Structure):
    """``struct xfer_ctr_page``."""

    _fields_ = [("data", ctypes.c_uint8 * PAGE)]


class BundleId(ctypes.Structure):
    """``struct xfer_bundle_id``."""

    _fields_ = [("id", ctypes.c_uint8 * 16)]


_CType = type[ctypes._SimpleCData] | type[ctypes.Structure]


def _checked(m: BpfMap, key: _CType, value: _CType) -> BpfMap:
    # A map pinned by an older build with another layout must not be misread.
    if (m.key_size, m.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
        raise BPFLoadError(f"pinned map {m.name} has key/value sizes {m.key_size}/"
                           f"{m.value_size}, this xfer expects {ctypes.sizeof(key)}/"
                           f"{ctypes.sizeof(value)}: detach, remove the pins, attach again")
    return m


class LiveCounters:
    """``xfer_ctr``: read and delete only."""

    def __init__(self, m: BpfMap) -> None:
        self.map = _checked(m, CounterKey, CounterValue)

    def read_columns(self, batch: bool = True) -> counters.Columns:
        """Every entry (batch syscalls, or a per-key walk with ``batch=False``)."""
        keys, values, _ = self.map.dump(batch)
        return counters.Columns(keys, values)

    def read_keys(self, keys: Sequence[bytes]) -> counters.Columns:
        """The entries of ``keys`` that exist (one lookup each: cheap for one VM)."""
        got = self.map.lookup_many(list(keys))
        return counters.Columns(b"".join(got), b"".join(got.values()))

    def delete(self, keys: Sequence[bytes], batch: bool = True) -> int:
        return self.map.delete_many(list(keys), batch)


class CarriedCounters:
    """The table of counts carried in, as ``xfer_maps.h`` lays it out.

    Writers (imports, forgets) hold the interface's lock exclusively, readers
    shared (``counters_device.locked``): ``stage`` fills the idle half while
    readers may be in the live one, ``commit`` switches with one element update.

        state = carried.state()
        table = carried.read(state)
        carried.commit(carried.stage(new_table, state))
    """

    def __init__(self, header: BpfMap, pages: BpfMap) -> None:
        self.header = _checked(header, ctypes.c_uint32, CarriedHeader)
        self.pages = _checked(pages, ctypes.c_uint32, CarriedPage)
        self.half = pages.max_entries // 2  # pages per half
        self.capacity = self.half * PAGE // (counters.KEY.size + counters.VALUE.size)

    def state(self) -> CarriedHeader:
        """The header: which half is live and how many entries it holds."""
        raw = self.header.lookup(bytes(4))
        if raw is None:
            raise BPFLoadError(f"BPF map {self.header.name} has no element 0")
        state = CarriedHeader.from_buffer_copy(raw)
        if state.version not in (0, CARRIED_VERSION) or state.count > self.capacity:
            raise BPFLoadError(f"carried counters in {self.header.name} have layout "
                               f"{state.version} and {state.count} entries; this xfer reads "
                               f"layout {CARRIED_VERSION} up to {self.capacity}: detach, "
                               "remove the pins, attach again")
        return state

    def read(self, state: CarriedHeader | None = None, batch: bool = True) -> counters.Columns:
        """The live table (of ``state``, or of the header read now)."""
        state = state if state is not None else self.state()
        n = state.count
        if not n:
            return counters.Columns()
        ks = n * counters.KEY.size
        used = ks + n * counters.VALUE.size
        raw = self.pages.read_slots(self._first(state.generation), -(-used // PAGE), batch)
        return counters.Columns(raw[:ks], raw[ks:used])

    def stage(self, cols: counters.Columns, state: CarriedHeader,
              batch: bool = True) -> CarriedHeader:
        """Write ``cols`` into the half ``state`` does not use; returns the header to commit.

        Raises KernelError when the table exceeds the capacity (nothing is committed).
        """
        n = len(cols)
        if n > self.capacity:
            raise KernelError(errno.E2BIG, f"carried counters: {n} entries, room for "
                              f"{self.capacity}")
        nxt = CarriedHeader(state.generation + 1, n, CARRIED_VERSION)
        if n:
            pad = bytes(-(len(cols.keys) + len(cols.values)) % PAGE)
            self.pages.write_slots(self._first(nxt.generation),
                                   b"".join((cols.keys, cols.values, pad)), batch)
        return nxt

    def commit(self, state: CarriedHeader) -> None:
        """Make ``state``'s half the live table (one element update: all or nothing)."""
        self.header.update(bytes(4), bytes(state))

    def _first(self, generation: int) -> int:
        return (generation % 2) * self.half


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
            live, header, pages, imported = opened
            return cls(LiveCounters(live), CarriedCounters(header, pages),
                       ImportedBundles(imported), pins)
        except BaseException:
            for m in opened:
                m.close()
            raise

    def close(self) -> None:
        for m in (self.live.map, self.carried.header, self.carried.pages, self.imported.map):
            m.close()

    def __enter__(self) -> CounterMaps:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
