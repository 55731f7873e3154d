"""Pure logic of the counters kind: keys, ownership, sums, the bundle section. No root."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xfer import bundle as bundle_mod
from xfer.bundle import Bundle, Section
from xfer.cli import app
from xfer.counters import model as counters
from xfer.counters import transfer as counters_transfer
from xfer.counters.device import PROGRAM
from xfer.counters.maps import ImportedBundles
from xfer.ebpf import loader
from xfer.errors import BPFLoadError, BundleError, ForeignEntryError
from xfer.model import Kind, VmIdentity, parse_vm

MAC = "02:00:00:00:00:02"
VM = parse_vm(f"10.0.0.2,fd00::2,{MAC}", inventory={})
OTHER = parse_vm("10.0.0.3,02:00:00:00:00:03", inventory={})


def test_key_round_trip_ipv4_and_ipv6() -> None:
    for ip in ("10.0.0.2", "fd00::2"):
        key = counters.make_key(MAC, ip)
        assert len(key) == counters.KEY.size == 24
        assert counters.split_key(key) == (MAC, ip)
    assert counters.make_key(MAC, "10.0.0.2")[6] == counters.FAMILY_IPV4
    assert counters.make_key(MAC, "fd00::2")[6] == counters.FAMILY_IPV6


def test_malformed_key_is_refused() -> None:
    bad = counters.KEY.pack(b"\x02" * 6, 9, bytes(16))
    with pytest.raises(BundleError):
        counters.split_key(bad)
    assert not counters.owner(VmIdentity("v", ("02:02:02:02:02:02",)))(bad)


def test_belongs_needs_the_vm_mac_and_ip() -> None:
    assert counters.belongs(counters.make_key(MAC, "10.0.0.2"), VM)
    assert counters.belongs(counters.make_key(MAC, "fd00::2"), VM)
    assert not counters.belongs(counters.make_key(MAC, "10.0.0.3"), VM)  # spoofed IP
    assert not counters.belongs(counters.make_key("02:00:00:00:00:03", "10.0.0.2"), VM)
    by_ip_only = VmIdentity("v", ipv4=("10.0.0.2",))
    assert counters.belongs(counters.make_key("02:00:00:00:00:09", "10.0.0.2"), by_ip_only)


def test_vm_keys_are_every_mac_ip_pair_or_none_without_mac() -> None:
    assert counters.vm_keys(VM) == [counters.make_key(MAC, "10.0.0.2"),
                                    counters.make_key(MAC, "fd00::2")]
    assert counters.vm_keys(VmIdentity("v", ipv4=("10.0.0.2",))) is None


def test_add_sums_key_by_key() -> None:
    a, b = counters.make_key(MAC, "10.0.0.2"), counters.make_key(MAC, "fd00::2")
    total = counters.add({a: (1, 2, 3, 4, 5, 6)}, {a: (10, 20, 30, 40, 50, 60), b: (1,) * 6})
    assert total == {a: (11, 22, 33, 44, 55, 66), b: (1,) * 6}


def test_selection_keeps_the_vm_entries() -> None:
    mine, theirs = counters.make_key(MAC, "10.0.0.2"), counters.make_key("02:00:00:00:00:03",
                                                                          "10.0.0.3")
    cols = counters.Columns.of({mine: (1,) * 6, theirs: (2,) * 6})
    sel = counters.selection(VM)
    assert sel.keys is not None and set(sel.keys) == set(counters.vm_keys(VM) or ())
    assert cols.select(sel).table() == {mine: (1,) * 6}
    by_ip = counters.selection(VmIdentity("v", ipv4=("10.0.0.3",)))
    assert by_ip.keys is None  # MAC unknown: scan and test
    assert cols.select(by_ip).table() == {theirs: (2,) * 6}
    fleet = counters.fleet_selection([VM, OTHER])
    assert cols.select(fleet) is cols  # everything kept: no copy


def test_add_columns() -> None:
    a = counters.Columns.of({counters.make_key(MAC, "10.0.0.2"): (1,) * 6})
    assert counters.add_columns(a, counters.Columns()) is a
    assert counters.add_columns(a, a).table() == {counters.make_key(MAC, "10.0.0.2"): (2,) * 6}
    assert len(counters.add_columns()) == 0


def test_columns_round_trip() -> None:
    table = {counters.make_key(MAC, "10.0.0.2"): (1, 2, 3, 4, 5, 2**63)}
    assert counters.Columns.of(table).table() == table
    with pytest.raises(BundleError):
        counters.Columns(b"x" * 24, b"")


def test_payload_is_keys_then_little_endian_values() -> None:
    key = counters.make_key(MAC, "10.0.0.2")
    payload = counters.pack_payload(counters.Columns.of({key: (1, 2, 3, 4, 5, 6)}))
    assert payload[:24] == key
    assert payload[24:32] == (1).to_bytes(8, "little")
    assert payload[-8:] == (6).to_bytes(8, "little")


def test_rows_follow_the_json_contract() -> None:
    table = {counters.make_key(MAC, "fd00::2"): (1, 2, 3, 4, 5, 6),
             counters.make_key(MAC, "10.0.0.2"): (7, 8, 9, 10, 11, 12)}
    rows = counters.rows(table)
    assert [r["ip"] for r in rows] == ["10.0.0.2", "fd00::2"]
    assert set(rows[0]) == {"mac", "ip", "tx_packets", "tx_bytes", "rx_packets", "rx_bytes",
                            "tcp_initiated", "tcp_accepted"}
    assert rows[0]["tcp_accepted"] == 12
    json.dumps(rows)


def _section(vm: VmIdentity, table: counters.Table) -> Section:
    return counters.encode_section(vm, counters.Columns.of(table))


def test_section_round_trips_through_a_bundle() -> None:
    table = {counters.make_key(MAC, "10.0.0.2"): (200, 19600, 200, 19600, 1, 0)}
    b = Bundle(VM, {}, {Kind.COUNTERS: _section(VM, table)})
    back = bundle_mod.decode(bundle_mod.encode(b))
    assert counters.decode_section(back.sections[Kind.COUNTERS], back.vm).table() == table


def test_section_for_another_vm_is_refused() -> None:
    section = _section(OTHER, {counters.make_key("02:00:00:00:00:03", "10.0.0.3"): (1,) * 6})
    with pytest.raises(ForeignEntryError):
        counters.decode_section(section, VM)


def test_foreign_entry_is_refused() -> None:
    # The section names the right VM but smuggles in another host's counters.
    section = _section(VM, {counters.make_key(MAC, "10.0.0.2"): (1,) * 6,
                            counters.make_key("02:00:00:00:00:03", "10.0.0.3"): (1,) * 6})
    with pytest.raises(ForeignEntryError):
        counters.decode_section(section, VM)


def test_malformed_sections_are_refused() -> None:
    good = _section(VM, {counters.make_key(MAC, "10.0.0.2"): (1,) * 6})
    for bad in (
        Section(Kind.COUNTERS, "other/1", good.count, good.payload, good.meta),
        Section(Kind.COUNTERS, good.encoding, 2, good.payload, good.meta),
        Section(Kind.COUNTERS, good.encoding, 1, good.payload[:-1], good.meta),
        Section(Kind.COUNTERS, good.encoding, 1, good.payload, {}),
        Section(Kind.COUNTERS, good.encoding, 2, good.payload[:24] * 2 + good.payload[24:] * 2,
                good.meta),  # the same key twice
        Section(Kind.COUNTERS, good.encoding, 1, good.payload, {**good.meta, "fields": ["x"]}),
    ):
        with pytest.raises(BundleError):
            counters.decode_section(bad, VM)


def test_import_refuses_foreign_sections_before_touching_a_device() -> None:
    # The namespace does not exist: reaching the device would raise NamespaceNotFound.
    section = _section(OTHER, {counters.make_key("02:00:00:00:00:03", "10.0.0.3"): (1,) * 6})
    b = Bundle(VM, {}, {Kind.COUNTERS: section})
    with pytest.raises(ForeignEntryError):
        counters_transfer.import_section(section, b, "xfer-no-such-namespace")
    with pytest.raises(ForeignEntryError):
        counters_transfer.import_section(_section(VM, {}), b, "xfer-no-such-namespace", vm=OTHER)


def test_bundle_id_key() -> None:
    uid = "798b64d98bfc418daa0bbddb3cb1bc09"
    assert ImportedBundles.key(uid) == bytes.fromhex(uid)
    assert len(ImportedBundles.key("not-hex")) == 16
    assert ImportedBundles.key("a") != ImportedBundles.key("b")


def test_pin_dir() -> None:
    assert str(loader.pin_dir("eth1", "fw-src")) == "/run/xfer/bpf/fw-src/eth1"
    assert str(loader.pin_dir("eth1")) == "/run/xfer/bpf/host/eth1"
    assert str(loader.pin_dir("eth1", "/run/netns/fw")) == "/run/xfer/bpf/fw/eth1"
    with pytest.raises(BPFLoadError):
        loader.pin_dir("../etc")


def test_program_source_is_package_data() -> None:
    text = loader.source_text(PROGRAM)
    assert '#include "xfer_maps.h"' in text
    for fn in PROGRAM.functions.values():
        assert f"int {fn}(" in text
    with pytest.raises(BPFLoadError):
        loader.source_text(loader.TcProgram("missing.bpf.c", {}, 1))


def test_cli_ebpf_prints_the_program() -> None:
    result = CliRunner().invoke(app, ["counters", "attach", "--dev", "eth1", "--ebpf"])
    assert result.exit_code == 0
    assert "xfer_ctr_ingress" in result.output


def test_select_keeps_order_and_values_whatever_the_mix() -> None:
    keys = [counters.make_key(f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", f"10.1.{i // 256}."
                              f"{i % 256}") for i in range(50)]
    cols = counters.Columns.of({k: (i,) * 6 for i, k in enumerate(keys)})
    for wanted in ({0, 1, 2, 49}, set(range(50)) - {0, 7, 8, 49}, {3}, set(range(50))):
        sel = counters.Selection(None, frozenset(keys[i] for i in wanted),
                                 frozenset(keys[i] for i in wanted).__contains__)
        got = cols.select(sel)
        assert got.key_list() == [keys[i] for i in sorted(wanted)]
        assert got.table() == {keys[i]: (i,) * 6 for i in wanted}
        predicate_only = counters.Selection(None, None, sel.test)
        assert cols.select(predicate_only) == got
