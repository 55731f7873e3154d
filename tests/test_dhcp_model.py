"""Bindings, lease arithmetic, ownership and the snooping database file (no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xfer.bundle import Bundle, Section
from xfer.dhcp import abi, persist
from xfer.dhcp.model import NS, Binding, belongs, check_owned, for_vm
from xfer.dhcp.transfer import ENCODING, section_bindings
from xfer.errors import BundleError, ForeignEntryError, UsageError
from xfer.model import Kind, VmIdentity

MAC = "02:00:00:00:00:02"
VM = VmIdentity("vm", macs=(MAC,), ipv4=("10.0.0.2",))


def test_datapath_round_trip_keeps_remaining_time() -> None:
    b = Binding(MAC.upper(), "10.0.0.2", 100.0, "vm0", vlan=7, lease=100)
    key, value = b.to_datapath(now_ns=5 * NS, ifindex=3)
    assert bytes(key.mac) == bytes.fromhex("020000000002") and bytes(key.ip) == bytes([10, 0, 0, 2])
    assert (value.expires_ns, value.ifindex, value.vlan, value.flags) == (105 * NS, 3, 7,
                                                                          abi.FLAG_DHCP)
    back = Binding.from_datapath(key, value, now_ns=45 * NS, ifname="vm0")
    assert back == Binding(MAC, "10.0.0.2", 60.0, "vm0", 7, "dhcp", 100)


def test_infinite_and_static() -> None:
    key, value = Binding(MAC, "10.0.0.2", None, None, source="static").to_datapath(10, 0)
    assert value.expires_ns == 0 and value.flags == abi.FLAG_STATIC
    back = Binding.from_datapath(key, value, 10**15, None)
    assert back.lease_remaining is None and not back.expired and back.source == "static"


def test_a_lease_ending_now_is_never_infinite() -> None:
    _, value = Binding(MAC, "10.0.0.2", 0.0).to_datapath(now_ns=0, ifindex=0)
    assert value.expires_ns == 1


@pytest.mark.parametrize("kw", [{"ip": "10.0.0"}, {"ip": "fd00::1"}, {"mac": "zz"},
                                {"vlan": 4095}, {"source": "magic"},
                                {"lease_remaining": float("nan")}])
def test_bad_bindings_are_refused(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"mac": MAC, "ip": "10.0.0.2", "lease_remaining": 1.0}
    args.update(kw)
    with pytest.raises(UsageError):
        Binding(**args)  # type: ignore[arg-type]


def test_ownership() -> None:
    mine = Binding(MAC, "10.0.0.2", 1.0)
    assert belongs(mine, VM)
    assert not belongs(Binding("02:00:00:00:00:03", "10.0.0.2", 1.0), VM)   # another MAC
    assert not belongs(Binding(MAC, "10.0.0.3", 1.0), VM)                   # another IP
    assert belongs(Binding("02:00:00:00:00:03", "10.0.0.2", 1.0),
                   VmIdentity("v", ipv4=("10.0.0.2",)))                     # MAC not named
    assert not belongs(mine, VmIdentity("v", ipv6=("fd00::2",)))
    with pytest.raises(ForeignEntryError, match="binding 1"):
        check_owned([mine, Binding(MAC, "10.0.0.9", 1.0)], VM)
    assert for_vm([mine, Binding("02:00:00:00:00:05", "10.0.0.5", 1.0)], VM) == [mine]


def test_aged() -> None:
    assert Binding(MAC, "10.0.0.2", 10.0).aged(4).lease_remaining == 6.0
    assert Binding(MAC, "10.0.0.2", None).aged(4).lease_remaining is None
    assert Binding(MAC, "10.0.0.2", 1.0).aged(2).expired


def test_database_file(tmp_path: Path) -> None:
    path = tmp_path / "db" / "sw.json"
    rows = [Binding(MAC, "10.0.0.2", 60.0, "vm0"), Binding(MAC, "10.0.0.3", None, None,
                                                           source="static"),
            Binding("02:00:00:00:00:04", "10.0.0.4", 5.0, "vm1")]
    persist.save(path, rows, now_wall=1000.0)
    back = persist.load(path, now_wall=1010.0)      # the 5 s lease expired meanwhile
    assert [(b.ip, b.lease_remaining) for b in back] == [("10.0.0.2", 50.0), ("10.0.0.3", None)]
    assert persist.load(tmp_path / "missing.json", 0.0) == []
    path.write_text("{")
    with pytest.raises(UsageError, match="corrupted"):
        persist.load(path, 0.0)
    path.write_text(json.dumps({"format": "other", "bindings": []}))
    with pytest.raises(UsageError, match="format"):
        persist.load(path, 0.0)


def test_default_database_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(tmp_path))
    assert persist.default_path("/run/netns/sw1") == tmp_path / "sw1.json"
    assert persist.default_path(None) == tmp_path / "_host.json"


def _section(records: object, count: int | None = None, encoding: str = ENCODING) -> Section:
    payload = json.dumps(records).encode()
    n = count if count is not None else (len(records) if isinstance(records, list) else 0)
    return Section(Kind.DHCP, encoding, n, payload)


def test_section_decoding() -> None:
    rec = Binding(MAC, "10.0.0.2", 30.0, "vm0").to_json()
    assert section_bindings(_section([rec]))[0].lease_remaining == 30.0
    bad = [
        _section([rec], encoding="other/1"),
        _section([rec], count=2),
        _section({"mac": MAC}),
        _section([{"mac": MAC}]),
        _section([{**rec, "ip": "300.0.0.1"}]),
        Section(Kind.DHCP, ENCODING, 1, b"[{"),
        _section([rec] * 2, count=5000),
    ]
    for section in bad:
        with pytest.raises(BundleError):
            section_bindings(section)


def test_bundle_round_trip_of_a_dhcp_section() -> None:
    from xfer import bundle

    section = _section([Binding(MAC, "10.0.0.2", 30.0, "vm0").to_json()])
    data = bundle.encode(Bundle(VM, {}, {Kind.DHCP: section}))
    assert section_bindings(bundle.decode(data).sections[Kind.DHCP])[0].ip == "10.0.0.2"
