"""Hostile bundles against a real kernel: whatever an import creates is the VM's, and a
refused or failed import leaves nothing behind (issue 11).

The witness of what the kernel holds is conntrack(8) for the count, and a raw
dump read by the trusted dump parser (not the import check) for tuples and status.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from netns_tests.lab_helpers import xfer
from tests import ct_fuzz
from tests.ct_factory import bundle_of
from xfer import transfer
from xfer.conntrack import constants as c
from xfer.conntrack import stream, wire
from xfer.conntrack import transfer as conntrack_transfer
from xfer.conntrack.model import CtTuple
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.stream import RawEntry
from xfer.errors import BundleError, ImportFailed, XferError
from xfer.lab.hosts import Hosts
from xfer.model import Kind, parse_vm

VM = parse_vm(f"{ct_fuzz.VM_V4},{ct_fuzz.VM_V6}", {})
OWNED = VM.packed_addresses


@pytest.fixture(scope="module")
def dst() -> Iterator[tuple[Hosts, str]]:
    """One destination namespace for the module, with NAT hooks (NATed entries are real)."""
    hosts = Hosts(f"h{os.getpid() % 10000}")
    try:
        ns = hosts.add("dst")
        hosts.nft(ns, "table ip nat { chain post { type nat hook postrouting priority 100; }; }\n"
                      "table ip6 nat { chain post { type nat hook postrouting priority 100; }; }\n")
        yield hosts, ns
    finally:
        hosts.close()


def _flush(hosts: Hosts, ns: str) -> None:
    hosts.run(ns, ["conntrack", "-F"])


def _count(hosts: Hosts, ns: str) -> int:
    out = hosts.run(ns, ["conntrack", "-L"]).stderr
    return int(re.search(r"(\d+) flow entries", out).group(1))  # type: ignore[union-attr]


def _kernel_tuple(t: CtTuple) -> ct_fuzz.KernelTuple:
    def port(p: int | None) -> bytes:
        return struct.pack(">H", p) if p is not None and t.icmp_id is None else b""

    return ct_fuzz.KernelTuple(ct_fuzz.packed(t.src), ct_fuzz.packed(t.dst), port(t.sport),
                               port(t.dport), struct.pack(">H", t.icmp_id) if t.icmp_id is not None else b"")


def _table(ns: str) -> list[tuple[ct_fuzz.KernelTuple, ct_fuzz.KernelTuple, int]]:
    """Every entry of the namespace as (original, reply, status), from a raw dump."""
    with CtNetlink(ns) as ct:
        dump = ct.dump_all()
    out = []
    for e in stream.entries(dump):
        entry = wire.parse_entry(e.family, e.blob)
        out.append((_kernel_tuple(entry.orig), _kernel_tuple(entry.reply), entry.status))
    return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=ct_fuzz.hostile_sections())
def test_fuzzed_bundles_create_only_the_vms_entries_or_nothing(dst: tuple[Hosts, str],
                                                              entries: list[RawEntry]) -> None:
    hosts, ns = dst
    _flush(hosts, ns)
    try:
        report = transfer.import_bundle(bundle_of(VM, entries), ns)
    except XferError:
        assert _count(hosts, ns) == 0, "a refused or failed import left entries behind"
        return
    if not report.ok:
        assert _count(hosts, ns) == 0, "a failed import left entries behind"
        return
    table = _table(ns)
    assert len(table) == report.total("created") == _count(hosts, ns)
    for orig, reply, status in table:
        assert ct_fuzz.belongs(orig, reply, status, OWNED), f"created another host's entry {orig} {reply}"


def _vm_entries(n: int) -> list[RawEntry]:
    from tests.ct_factory import tcp_entry
    return [tcp_entry(ct_fuzz.VM_V4, "10.0.9.1", 1024 + i, 80) for i in range(n)]


def _with_tcp_state(entry: RawEntry, state: int) -> RawEntry:
    blob = bytearray(entry.blob)
    # the protoinfo comes last; CTA_PROTO_NUM has the same header (length 5, type 1)
    at = blob.rindex(struct.pack("=HH", 5, c.CTA_PROTOINFO_TCP_STATE)) + 4
    blob[at] = state
    return RawEntry(entry.family, bytes(blob))


def test_an_entry_the_kernel_refuses_midway_rolls_back_everything(dst: tuple[Hosts, str]) -> None:
    """Issue 11.2: the kernel refuses entry 600 of 1,209 (TCP state 200 >= TCP_CONNTRACK_MAX):
    the 1,208 it created are deleted again."""
    hosts, ns = dst
    _flush(hosts, ns)
    entries = _vm_entries(1209)
    entries[600] = _with_tcp_state(entries[600], 200)
    report = transfer.import_bundle(bundle_of(VM, entries), ns)
    assert not report.ok and report.kinds[Kind.CONNTRACK].rolled_back
    assert re.search(r"1 of 1209 conntrack entries failed \(entry 600 \(10\.0\.1\.2 -> 10\.0\.9\.1\): "
                     r"Numerical result out of range\); rolled back 1208", report.errors[Kind.CONNTRACK])
    assert _count(hosts, ns) == 0
    with pytest.raises(ImportFailed):  # the kind's own call raises it
        conntrack_transfer.import_section(bundle_of(VM, entries).sections[Kind.CONNTRACK],
                                          bundle_of(VM, entries), ns)
    assert _count(hosts, ns) == 0


def test_a_failure_while_describing_a_failure_still_rolls_back(dst: tuple[Hosts, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.2: whatever the error path raises, what went in comes out again."""
    hosts, ns = dst
    _flush(hosts, ns)
    entries = _vm_entries(300)
    entries[100] = _with_tcp_state(entries[100], 200)

    def broken(*args: object, **kw: object) -> object:
        raise RuntimeError("describing failed")

    monkeypatch.setattr("xfer.conntrack.transfer.describe", broken)
    with pytest.raises(RuntimeError, match="describing failed"):
        transfer.import_bundle(bundle_of(VM, entries), ns)
    assert _count(hosts, ns) == 0


def test_the_entry_whose_description_used_to_crash_is_refused_before_anything_goes_in(
        dst: tuple[Hosts, str]) -> None:
    """Issue 11.2, the reported shape: an empty CTA_ZONE passed the old check, the kernel
    refused it, and describing it raised so the rollback never ran (1,208 entries stayed)."""
    hosts, ns = dst
    _flush(hosts, ns)
    entries = _vm_entries(1209)
    entries[600] = RawEntry(entries[600].family, entries[600].blob + struct.pack("=HH", 4, c.CTA_ZONE))
    with pytest.raises(BundleError, match=r"entry 600 is malformed: entry: CTA_ZONE has 0 bytes"):
        transfer.import_bundle(bundle_of(VM, entries), ns)
    assert _count(hosts, ns) == 0


def test_the_cli_refuses_with_one_line_and_creates_nothing(dst: tuple[Hosts, str], tmp_path: Path) -> None:
    from xfer import bundle

    hosts, ns = dst
    _flush(hosts, ns)
    entries = _vm_entries(50)
    entries[20] = _with_tcp_state(entries[20], 200)
    path = tmp_path / "b.xfer"
    bundle.write(path, bundle_of(VM, entries))
    out = xfer("import", str(path), "--netns", ns, "--vm", f"{ct_fuzz.VM_V4},{ct_fuzz.VM_V6}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "rolled back 49" in out.stderr
    assert _count(hosts, ns) == 0
