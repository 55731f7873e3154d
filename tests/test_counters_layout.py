"""The ctypes mirrors of xfer_maps.h have clang's layout (as Cilium's alignment checker does).

Compiles a probe with bcc: ``_Static_assert``s built from the ctypes offsets fail
the compile on any mismatch, and bcc's own key/leaf types (made from clang's
layout) are compared field by field. Creating the probe's maps needs root.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from xfer.counters import model as counters
from xfer.counters.maps import (
    CARRIED_VERSION,
    PAGE,
    BundleId,
    CarriedHeader,
    CarriedPage,
    CounterKey,
    CounterValue,
)
from xfer.ebpf import loader

MIRRORS = {"xfer_ctr_key": CounterKey, "xfer_ctr_val": CounterValue, "xfer_bundle_id": BundleId,
           "xfer_ctr_carried": CarriedHeader, "xfer_ctr_page": CarriedPage}
CONSTANTS = {"XFER_CARRIED_PAGE": PAGE, "XFER_CARRIED_VERSION": CARRIED_VERSION}


def _asserts() -> str:
    lines = []
    for c_name, mirror in MIRRORS.items():
        lines.append(f"_Static_assert(sizeof(struct {c_name}) == {ctypes.sizeof(mirror)}, "
                     f'"{c_name} size");')
        for field, *_ in mirror._fields_:
            off = getattr(mirror, field).offset
            lines.append(f"_Static_assert(__builtin_offsetof(struct {c_name}, {field}) == {off},"
                         f' "{c_name}.{field} offset");')
    for name, value in CONSTANTS.items():
        lines.append(f'_Static_assert({name} == {value}, "{name}");')
    return "\n".join(lines)


def test_struct_module_agrees_with_ctypes() -> None:
    assert counters.KEY.size == ctypes.sizeof(CounterKey)
    assert counters.VALUE.size == ctypes.sizeof(CounterValue)
    assert CounterKey.addr.offset == 8 and CounterKey.family.offset == 6
    # The carried table packs keys then values: both sizes must stay multiples of 8.
    assert counters.KEY.size % 8 == 0 and counters.VALUE.size % 8 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="bcc creates the probe's maps: needs root")
def test_ctypes_mirrors_match_the_compiled_header() -> None:
    bcc = pytest.importorskip("bcc")
    probe = f"""
#include "xfer_maps.h"
{_asserts()}
BPF_HASH(k, struct xfer_ctr_key, struct xfer_ctr_val, 1);
BPF_HASH(b, struct xfer_bundle_id, __u64, 1);
BPF_ARRAY(h, struct xfer_ctr_carried, 1);
BPF_ARRAY(p, struct xfer_ctr_page, 1);
"""
    with loader.source_file("xfer_maps.h") as header:
        try:
            bpf = bcc.BPF(text=probe.encode(), cflags=[f"-I{header.parent}"])
        except Exception as exc:
            pytest.fail(f"probe does not compile (layout mismatch?): {exc}")
    try:
        for table, key, leaf in (("k", CounterKey, CounterValue), ("b", BundleId, None),
                                 ("h", None, CarriedHeader), ("p", None, CarriedPage)):
            compiled = bpf[table.encode()]
            if key is not None:
                assert ctypes.sizeof(compiled.Key) == ctypes.sizeof(key)
                for field, *_ in key._fields_:
                    assert getattr(compiled.Key, field).offset == getattr(key, field).offset
            if leaf is not None:
                assert ctypes.sizeof(compiled.Leaf) == ctypes.sizeof(leaf)
                for field, *_ in leaf._fields_:
                    assert getattr(compiled.Leaf, field).offset == getattr(leaf, field).offset
    finally:
        bpf.cleanup()
