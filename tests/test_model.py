from pathlib import Path

import pytest

from xfer.errors import UsageError
from xfer.model import Kind, load_inventory, parse_kinds, parse_vm


def test_vm_from_addresses() -> None:
    vm = parse_vm("10.0.0.2, fd00::2,02-00-00-AA-bb-01", {})
    assert vm.ipv4 == ("10.0.0.2",)
    assert vm.ipv6 == ("fd00::2",)
    assert vm.macs == ("02:00:00:aa:bb:01",)
    assert vm.owns_ip("10.0.0.2") and vm.owns_ip(bytes([10, 0, 0, 2]))
    assert not vm.owns_ip("10.0.0.3")


@pytest.mark.parametrize("spec", ["bogus", "10.0.0.300", "", "02:00:00:aa:bb"])
def test_vm_rejects_what_is_neither_address_nor_name(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_vm(spec, {})


def test_vm_from_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text('[vm.web1]\nmac = "02:00:00:00:00:02"\nipv4 = ["10.0.1.2"]\nipv6 = ["fd00:1::2"]\n')
    vm = parse_vm("web1", load_inventory(inv))
    assert vm.id == "web1" and vm.addresses == ("10.0.1.2", "fd00:1::2")


def test_kinds() -> None:
    assert parse_kinds("dhcp,conntrack") == (Kind.CONNTRACK, Kind.DHCP)
    assert parse_kinds(None) == (Kind.CONNTRACK,)
    with pytest.raises(UsageError, match="unknown kind"):
        parse_kinds("conntrack,arp")
