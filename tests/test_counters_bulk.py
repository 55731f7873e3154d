"""Bulk paths of the counters kind against a plain-dict model: every path gives exact answers.

Sizes straddle ``counters.LOOKUP_LIMIT`` and ``counters.BULK`` so the scan, Python-set
and numpy paths all run; a hash that sends every key to one slot shows the numpy
index stays exact. The carried table runs over an in-memory stand-in for its two
array maps (the kernel side is in netns_tests/test_counters.py).
"""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest

from xfer.counters import keyjoin
from xfer.counters import model as counters
from xfer.counters.maps import CARRIED_VERSION, PAGE, CarriedCounters, CarriedHeader
from xfer.errors import BPFLoadError, BundleError, ForeignEntryError, KernelError
from xfer.model import VmIdentity

WRAP = 2**64


def _key(i: int, v6: bool = False) -> bytes:
    mac = "02:aa:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
    if v6:
        ip = f"fd00:77::{i // 65536:x}:{i % 65536:x}"
    else:
        ip = f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return counters.make_key(mac, ip)


def _table(keys: list[bytes], rng: random.Random) -> counters.Table:
    return {k: tuple(rng.randrange(WRAP) for _ in counters.FIELDS) for k in keys}


def _model_add(a: counters.Table, b: counters.Table) -> counters.Table:
    out = dict(a)
    for k, v in b.items():
        out[k] = tuple((x + y) % WRAP for x, y in zip(out.get(k, counters.ZERO), v, strict=True))
    return out


def _keyset_selection(keys: list[bytes]) -> counters.Selection:
    frozen = frozenset(keys)
    few = tuple(sorted(frozen)) if len(frozen) <= counters.LOOKUP_LIMIT else None
    return counters.Selection(few, frozen, frozen.__contains__)


@pytest.fixture
def one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key hashes alike: the index is one long probe run, found only by comparing keys."""
    monkeypatch.setattr(keyjoin, "hashes", lambda w: np.zeros(len(w), dtype=np.uint64))


@pytest.mark.parametrize("colliding", [False, True])
def test_key_index_finds_exactly_the_keys_it_holds(request: pytest.FixtureRequest,
                                                   colliding: bool) -> None:
    if colliding:
        request.getfixturevalue("one_slot")
    held = [_key(i, i % 2 == 1) for i in range(300)]
    index = keyjoin.KeyIndex(b"".join(held))
    asked = [*held[::7], _key(10_000), _key(3, True), _key(5, False), _key(99_999, True)]
    where = {k: i for i, k in enumerate(held)}
    assert index.find(b"".join(asked)).tolist() == [where.get(k, -1) for k in asked]
    assert keyjoin.KeyIndex(b"").find(b"".join(asked)).tolist() == [-1] * len(asked)
    assert index.find(b"").tolist() == []


def test_a_key_matching_across_two_keys_is_not_found_by_position() -> None:
    # The bytes of a key can straddle two others in the block; only aligned matches count.
    a, b = _key(1), _key(2)
    cols = counters.Columns(a + b, bytes(96))
    straddling = (a + b)[12:36]
    assert cols.position(straddling) == -1
    assert cols.position(b) == 1


@pytest.mark.parametrize("n_keys", [counters.LOOKUP_LIMIT // 2, 200, counters.BULK + 300])
@pytest.mark.parametrize("wanted", ["few", "many", "predicate"])
def test_select_and_exclude_agree_with_the_model(n_keys: int, wanted: str) -> None:
    rng = random.Random(n_keys)
    keys = [_key(i, i % 3 == 0) for i in range(n_keys)]
    table = _table(keys, rng)
    cols = counters.Columns.of(table)
    chosen = rng.sample(keys, min(len(keys), 5 if wanted == "few" else len(keys) * 2 // 3))
    chosen.append(_key(1_000_000))  # a key the table does not hold
    sel = _keyset_selection(chosen)
    if wanted == "predicate":
        sel = counters.Selection(None, None, frozenset(chosen).__contains__)
    assert cols.select(sel).table() == {k: v for k, v in table.items() if k in chosen}
    assert cols.exclude(sel).table() == {k: v for k, v in table.items() if k not in chosen}


def test_select_copies_nothing_when_everything_is_kept() -> None:
    keys = [_key(i) for i in range(counters.BULK + 10)]
    cols = counters.Columns.of(dict.fromkeys(keys, (1,) * 6))
    assert cols.select(_keyset_selection(keys)) is cols
    assert cols.exclude(_keyset_selection([_key(10**6)])) is cols


@pytest.mark.parametrize(("n_a", "n_b"), [(3, 2000), (2000, 3), (100, 150), (900, 1200),
                                          (1200, 0)])
@pytest.mark.parametrize("colliding", [False, True])
def test_merge_sums_exactly_on_every_path(request: pytest.FixtureRequest, n_a: int, n_b: int,
                                          colliding: bool) -> None:
    if colliding:
        request.getfixturevalue("one_slot")
    rng = random.Random(n_a * 7 + n_b)
    universe = [_key(i, i % 2 == 0) for i in range(n_a + n_b)]
    a = _table(rng.sample(universe, n_a), rng)
    b = _table(rng.sample(universe, n_b), rng)  # overlaps a by chance, sums wrap at 2**64
    total, both = counters.merge(counters.Columns.of(a), counters.Columns.of(b))
    assert total.table() == _model_add(a, b)
    assert len(total) == len(total.table())  # no key twice
    assert both == len(a.keys() & b.keys())
    assert counters.add_columns(counters.Columns.of(a), counters.Columns.of(b)).table() == \
        counters.add(a, b)


def test_sums_wrap_like_the_kernel_counters() -> None:
    k = _key(1)
    top = (WRAP - 1,) * 6
    assert counters.add({k: top}, {k: (2,) * 6})[k] == (1,) * 6


def _vm_with(n: int) -> tuple[VmIdentity, list[bytes]]:
    """One MAC and ``n`` IPv4 + ``n`` IPv6 addresses: 2n keys, enough for the numpy paths."""
    mac = "02:00:00:00:00:42"
    v4 = tuple(f"10.42.{i // 256}.{i % 256}" for i in range(n))
    v6 = tuple(f"fd00:42::{i:x}" for i in range(n))
    return VmIdentity("big", (mac,), v4, v6), [counters.make_key(mac, ip) for ip in v4 + v6]


def test_a_bulk_section_is_checked_key_by_key() -> None:
    vm, keys = _vm_with(counters.BULK)
    sel = counters.selection(vm)
    assert sel.keys is None and sel.keyset is not None  # too many to look up: the bulk path
    cols = counters.Columns.of(_table(keys, random.Random(1)))
    back = counters.unpack_payload(counters.pack_payload(cols), len(cols), sel, vm.id)
    assert back.table() == cols.table()

    stranger = counters.make_key("02:00:00:00:00:43", "10.42.0.1")  # the VM's IP, another MAC
    smuggled = counters.Columns(cols.keys[:-24] + stranger, cols.values)
    with pytest.raises(ForeignEntryError, match=r"02:00:00:00:00:43 10\.42\.0\.1"):
        counters.unpack_payload(counters.pack_payload(smuggled), len(cols), sel, vm.id)
    twice = counters.Columns(cols.keys[:-24] + cols.keys[:24], cols.values)
    with pytest.raises(BundleError, match="twice"):
        counters.unpack_payload(counters.pack_payload(twice), len(cols), sel, vm.id)


# --- the carried table over an in-memory stand-in for its maps ---------------------------------

class ArrayMap:
    """Enough of ``BpfMap`` for an array map kept in memory."""

    def __init__(self, name: str, value_size: int, slots: int) -> None:
        self.name, self.key_size, self.value_size, self.max_entries = name, 4, value_size, slots
        self.slots = [bytes(value_size)] * slots
        self.writes = 0

    def lookup(self, key: bytes) -> bytes | None:
        return self.slots[int.from_bytes(key, "little")]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.slots[int.from_bytes(key, "little")] = bytes(value)

    def read_slots(self, first: int, n: int, batch: bool = True) -> bytes:
        return b"".join(self.slots[first:first + n])

    def write_slots(self, first: int, values: bytes, batch: bool = True) -> None:
        vs = self.value_size
        for i in range(len(values) // vs):
            self.slots[first + i] = values[i * vs:(i + 1) * vs]
        self.writes += 1


def _carried(pages_per_half: int = 1) -> tuple[CarriedCounters, ArrayMap, ArrayMap]:
    header = ArrayMap("xfer_ctr_carried", 16, 1)
    pages = ArrayMap("xfer_ctr_pages", PAGE, 2 * pages_per_half)
    return CarriedCounters(header, pages), header, pages  # type: ignore[arg-type]


def test_carried_table_commits_by_switching_halves() -> None:
    store, _, _ = _carried()
    assert store.capacity == PAGE // 72
    assert len(store.read()) == 0 and store.state().version == 0  # never written: empty
    first = counters.Columns.of(_table([_key(i) for i in range(300)], random.Random(2)))
    state = store.state()
    staged = store.stage(first, state)
    assert len(store.read()) == 0  # staged, not committed: readers still see the old table
    store.commit(staged)
    assert store.read().table() == first.table()
    assert store.state().version == CARRIED_VERSION and store.state().generation == 1

    # The next table goes to the other half: the committed one stays readable meanwhile.
    before = store.state()
    second = counters.Columns.of(_table([_key(i) for i in range(50)], random.Random(3)))
    staged = store.stage(second, before)
    assert store.read(before).table() == first.table()
    store.commit(staged)
    assert store.read().table() == second.table()
    store.commit(before)  # what an import does to undo: the old half is intact
    assert store.read().table() == first.table()


def test_carried_table_refuses_what_it_cannot_hold_or_read() -> None:
    store, header, pages = _carried()
    too_many = counters.Columns.of(dict.fromkeys((_key(i) for i in range(store.capacity + 1)),
                                                 (1,) * 6))
    with pytest.raises(KernelError) as err:
        store.stage(too_many, store.state())
    assert err.value.errno == errno.E2BIG and pages.writes == 0
    header.update(bytes(4), bytes(CarriedHeader(1, 5, CARRIED_VERSION + 1)))
    with pytest.raises(BPFLoadError, match="layout"):
        store.state()
    header.update(bytes(4), bytes(CarriedHeader(1, store.capacity + 1, CARRIED_VERSION)))
    with pytest.raises(BPFLoadError, match="entries"):
        store.state()
