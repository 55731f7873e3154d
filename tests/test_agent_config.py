"""Agent configuration: what a valid file gives, and one clear error per defect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xfer.agent.config import AgentConfig, load, parse
from xfer.errors import UsageError
from xfer.model import Kind

GOOD = """
[device]
id = "fw-src-1"
type = "firewall"
kinds = ["counters", "conntrack"]
netns = "xfer-fwsrc"

[listen]
address = "10.0.4.1"
port = 7443
metrics = "127.0.0.1:9464"

[tls]
cert = "fw.pem"
key = "fw.key"
ca = "/etc/xfer/pki/ca.pem"
allowed_peers = ["manager"]

[limits]
max_bundle_bytes = 1048576

[state]
dir = "state"

[counters]
interfaces = ["vm0"]
"""


def _raw(**changes: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"device": {"id": "d", "type": "router", "kinds": ["conntrack"]},
                           "tls": {"cert": "c.pem", "key": "c.key", "ca": "ca.pem"}}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_good_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    cfg = load(path)
    assert isinstance(cfg, AgentConfig)
    assert (cfg.device_id, cfg.device_type, cfg.netns) == ("fw-src-1", "firewall", "xfer-fwsrc")
    assert cfg.kinds == (Kind.CONNTRACK, Kind.COUNTERS)
    assert cfg.url == "https://10.0.4.1:7443"
    assert cfg.metrics == ("127.0.0.1", 9464)
    # Relative paths are the file's neighbours; absolute ones stay.
    assert cfg.tls.cert == tmp_path / "fw.pem"
    assert cfg.tls.ca == Path("/etc/xfer/pki/ca.pem")
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.allowed_peers == frozenset({"manager"})
    assert cfg.max_bundle_bytes == 1048576
    assert cfg.counter_interfaces == ("vm0",)
    assert cfg.holds(Kind.COUNTERS) and not cfg.holds(Kind.DHCP)


def test_defaults() -> None:
    cfg = parse(_raw())
    assert (cfg.address, cfg.port, cfg.netns, cfg.metrics) == ("127.0.0.1", 7443, None, None)
    assert cfg.bundle_key_file is None


def test_manager_section_for_the_device_driven_variant() -> None:
    up = {"url": "https://10.0.4.9:8700", "group": "239.7.7.7:8702", "interface": "10.0.4.1"}
    cfg = parse(_raw(manager=up))
    assert cfg.manager is not None
    assert (cfg.manager.url, cfg.manager.group, cfg.manager.interface) == (
        "https://10.0.4.9:8700", ("239.7.7.7", 8702), "10.0.4.1")
    assert cfg.manager.device == "d", "the topology id defaults to device.id"
    assert parse(_raw(manager={**up, "device": "fw-a"})).manager.device == "fw-a"  # type: ignore[union-attr]
    assert parse(_raw()).manager is None


def test_vdp_section_uses_the_device_namespace_and_tls() -> None:
    vdp = {"ports": ["p1", "p2"], "server": "hv7", "manager": "https://10.0.4.9:8700/v1/migrations",
           "sequence_file": "vdp.seq"}
    cfg = parse(_raw(device={"id": "sw", "type": "switch", "kinds": ["conntrack"], "netns": "sw1"},
                     vdp=vdp), base=Path("/etc/xfer"))
    assert cfg.vdp is not None
    assert (cfg.vdp.netns, cfg.vdp.ports, cfg.vdp.server) == ("sw1", ("p1", "p2"), "hv7")
    assert (cfg.vdp.ca, cfg.vdp.cert) == (cfg.tls.ca, cfg.tls.cert)
    assert cfg.vdp.sequence_file == Path("/etc/xfer/vdp.seq")
    assert parse(_raw()).vdp is None
    vdp.pop("sequence_file")
    cfg = parse(_raw(vdp=vdp, state={"dir": "/var/lib/xfer/sw"}))
    assert cfg.vdp is not None and cfg.vdp.sequence_file == Path("/var/lib/xfer/sw/vdp.seq")
    with pytest.raises(UsageError, match="either a manager URL or a UDP address"):
        parse(_raw(vdp={"ports": ["p1"], "server": "hv7"}))


def test_ipv6_listen_url() -> None:
    assert parse(_raw(listen={"address": "fd00:4::1"})).url == "https://[fd00:4::1]:7443"


@pytest.mark.parametrize(("raw", "message"), [
    (_raw(device={"id": ""}), "device.id is required"),
    (_raw(device={"type": "toaster"}), "device.type 'toaster'"),
    (_raw(device={"kinds": []}), "at least one kind"),
    (_raw(device={"kinds": ["conntrack", "nat"]}), "unknown kind 'nat'"),
    (_raw(listen={"address": "fw1"}), "not an IP address"),
    (_raw(listen={"port": 70000}), "port number"),
    (_raw(listen={"metrics": "9464"}), "ADDRESS:PORT"),
    (_raw(tls={"ca": ""}), "tls.ca is required"),
    (_raw(limits={"max_bundle_bytes": 10}), "max_bundle_bytes"),
    (_raw(device={"kinds": ["counters"]}), "counters.interfaces is empty"),
    (_raw(device={"kinds": ["dhcp"]}, dhcp={"trusted": "up0"}), "dhcp.trusted/untrusted"),
    (_raw(dhcp={"max_bindings": -1}), "dhcp.max_bindings must be an integer"),
    (_raw(counters={"max_keys": 10}), "counters.max_keys must be an integer from 1024"),
    (_raw(dhcp={"max_bindings": "16"}), "dhcp.max_bindings must be an integer"),
    ({**_raw(), "extra": {}}, "unknown section(s) extra"),
    (_raw(manager={"group": "239.7.7.7:8702", "interface": "10.0.4.1"}), "manager.url is required"),
    (_raw(manager={"url": "http://10.0.4.9:8700", "group": "239.7.7.7:8702", "interface": "10.0.4.1"}),
     "manager.url: agent URL 'http://10.0.4.9:8700' must look like https://HOST:PORT"),
    (_raw(manager={"url": "https://10.0.4.9:8700", "group": "10.0.4.9:8702", "interface": "10.0.4.1"}),
     "'10.0.4.9' is not an IPv4 multicast address"),
    (_raw(manager={"url": "https://10.0.4.9:8700", "group": "239.7.7.7", "interface": "10.0.4.1"}),
     "manager.group must be ADDRESS:PORT"),
    (_raw(manager={"url": "https://10.0.4.9:8700", "group": "239.7.7.7:8702"}),
     "manager.interface is required"),
    (_raw(manager={"url": "https://10.0.4.9:8700", "group": "239.7.7.7:8702", "interface": "ag0"}),
     "manager.interface 'ag0' is not an IP address"),
    (_raw(manager={"url": "https://m:1", "group": "239.7.7.7:1", "interface": "10.0.4.1", "grp": 1}),
     "unknown key(s) in [manager]: grp"),
    ({**_raw(), "device": "fw"}, "[device] must be a table"),
])
def test_defects_are_named(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(raw)
    assert message in str(info.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[device\n")
    with pytest.raises(UsageError, match=r"bad\.toml"):
        load(bad)


def test_shipped_example_parses() -> None:
    cfg = load(Path(__file__).parent.parent / "contrib" / "agent.toml")
    assert cfg.kinds == (Kind.CONNTRACK,) and cfg.url == "https://10.0.4.1:7443"


def test_dhcp_port_limit_is_on_by_default() -> None:
    raw = _raw(device={"kinds": ["dhcp"]}, dhcp={"trusted": "up0", "untrusted": ["vm0"]})
    assert parse(raw).dhcp_max_bindings == 16
    raw["dhcp"]["max_bindings"] = 0
    assert parse(raw).dhcp_max_bindings == 0


def test_counters_table_size_is_configurable() -> None:
    raw = _raw(device={"kinds": ["counters"]}, counters={"interfaces": ["vm0"]})
    assert parse(raw).counter_max_keys is None        # the default size (or what is pinned)
    raw["counters"]["max_keys"] = 131072
    assert parse(raw).counter_max_keys == 131072


def test_privilege_separation_is_opt_in() -> None:
    raw = _raw()
    assert parse(raw).privsep_user is None
    raw["privsep"] = {"user": "xfer"}
    assert parse(raw).privsep_user == "xfer"
