"""Topology parsing, uplink paths and device selection (no root)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manager_fakes import TOPOLOGY, topo
from xfer.manager import plan, topology
from xfer.manager.topology import TopologyError
from xfer.model import Kind


def _raw() -> dict[str, Any]:
    return copy.deepcopy(TOPOLOGY)


def test_uplink_paths_nearest_the_server_first() -> None:
    t = topo()
    assert topology.uplink_path(t, "hv1") == ["fw-a", "rt-a"]
    assert topology.uplink_path(t, "hv2") == ["sw-b", "fw-b"]
    assert [d.id for d in topology.path_devices(t, "hv3")] == ["fw-c"]


def test_combined_box_at_the_source_separate_boxes_at_the_destination() -> None:
    p = plan.select(topo(), "hv1", "hv2")
    routes = {r.kind: (r.source.id, [d.id for d in r.destinations]) for r in p.routes}
    assert routes == {Kind.CONNTRACK: ("fw-a", ["fw-b"]), Kind.DHCP: ("fw-a", ["sw-b"]),
                      Kind.COUNTERS: ("fw-a", ["fw-b"])}
    assert p.missing == {}
    assert {d.id for d in p.by_source()} == {"fw-a"}
    assert {(s.id, d.id): k for (s, d), k in p.pairs().items()} == {
        ("fw-a", "fw-b"): [Kind.CONNTRACK, Kind.COUNTERS], ("fw-a", "sw-b"): [Kind.DHCP]}


def test_a_kind_without_holder_on_one_side_is_reported_not_dropped() -> None:
    p = plan.select(topo(), "hv1", "hv3")
    assert p.kinds() == (Kind.CONNTRACK,)
    assert "hv3" in p.missing[Kind.DHCP] and "lost" in p.missing[Kind.DHCP]
    assert Kind.COUNTERS in p.missing
    back = plan.select(topo(), "hv3", "hv1", [Kind.CONNTRACK, Kind.DHCP])
    assert "hv3's uplink path" in back.missing[Kind.DHCP]


def test_a_kind_held_by_several_source_devices_names_the_others() -> None:
    raw = _raw()
    raw["devices"]["rt-a"] = {"type": "router", "kinds": ["conntrack"], "agent": "https://10.0.4.9:7443"}
    p = plan.select(topology.parse(raw), "hv1", "hv2")
    ct = next(r for r in p.routes if r.kind is Kind.CONNTRACK)
    # The nearest holder gives; the router's copy is reported, not moved and not silently ignored.
    assert ct.source.id == "fw-a" and [d.id for d in ct.also_held_by] == ["rt-a"]
    assert {k: [d.id for d in v] for k, v in p.also_held_by().items()} == {Kind.CONNTRACK: ["rt-a"]}
    assert p.to_dict()["routes"][0]["also_held_by"] == ["rt-a"]
    assert "also_held_by" not in p.to_dict()["routes"][1]


def test_a_plan_without_destination_is_resolved_when_the_destination_announces_itself() -> None:
    t = topo()
    half = plan.select(t, "hv1", "")
    assert half.destination == "" and half.kinds() == (Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)
    assert all(r.destinations == () for r in half.routes) and half.missing == {}
    assert plan.resolve(half, t, "hv2").pairs() == plan.select(t, "hv1", "hv2").pairs()
    # hv3 has no switch or counter: those kinds are reported as lost, conntrack still moves.
    to3 = plan.resolve(half, t, "hv3")
    assert to3.kinds() == (Kind.CONNTRACK,) and "lost" in to3.missing[Kind.DHCP]
    with pytest.raises(TopologyError, match="same server"):
        plan.resolve(half, t, "hv1")


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["devices"]["fw-a"].update(type="toaster"), "type 'toaster'"),
    (lambda r: r["devices"]["fw-a"].update(kinds=["conntrack", "bogus"]), "unknown kind 'bogus'"),
    (lambda r: r["devices"]["fw-b"].pop("agent"), "names no agent"),
    (lambda r: r["devices"]["fw-b"].update(agent="http://x:1"), "https://HOST:PORT"),
    (lambda r: r["links"].append(["hv1", "nowhere"]), "unknown node 'nowhere'"),
    (lambda r: r["links"].append(["hv1"]), "must be a pair"),
    (lambda r: r["servers"]["hv1"].update(gateway="gw9"), "not in gateways"),
    (lambda r: r["links"].remove(["rt-a", "gw"]), "server 'hv1' has no path to its gateway 'gw'"),
    (lambda r: r.update(extra=1), "unknown key(s) extra"),
    (lambda r: r["vms"].update(bad={"ipv4": ["10.0.0.300"]}), "vm 'bad'"),
])
def test_check_names_the_defect(change: Any, message: str) -> None:
    raw = _raw()
    change(raw)
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        topology.parse(raw)


def test_path_does_not_cross_another_server() -> None:
    raw = _raw()
    # hv3's only way to the gateway would be through hv1: servers are not transit nodes.
    raw["links"] = [link for link in raw["links"] if link != ["fw-c", "gw"]] + [["fw-c", "hv1"]]
    with pytest.raises(TopologyError, match="hv3"):
        topology.parse(raw)


def test_unknown_server_and_vm_are_clear() -> None:
    t = topo()
    with pytest.raises(TopologyError, match="unknown server 'hv9'"):
        plan.select(t, "hv1", "hv9")
    with pytest.raises(TopologyError, match="same server"):
        plan.select(t, "hv1", "hv1")
    with pytest.raises(Exception, match="unknown VM 'ghost'"):
        t.vm("ghost")
    assert t.vm("vm1").ipv4 == ("10.0.1.2",)
    assert t.vm("10.0.1.9").ipv4 == ("10.0.1.9",)


def test_load_yaml_and_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xfer.cli import app

    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps(TOPOLOGY))))
    assert topology.load(f).servers["hv1"] == "gw"
    runner = CliRunner()
    out = runner.invoke(app, ["topology", "show", str(f)])
    assert out.exit_code == 0 and "hv1 -> fw-a[conntrack,dhcp,counters] -> rt-a[-] -> gw" in out.stdout
    out = runner.invoke(app, ["topology", "show", str(f), "--from", "hv1", "--to", "hv2"])
    assert "dhcp: fw-a -> sw-b" in out.stdout
    assert runner.invoke(app, ["topology", "check", str(f)]).exit_code == 0
    f.write_text("servers: [1, 2]\n")
    with pytest.raises(TopologyError, match="servers must be a mapping"):
        topology.load(f)


def test_cli_default_manager_url_is_the_hooks() -> None:
    import inspect

    from xfer.cli import manager as cli
    from xfer.hypervisor.hook import HookOptions

    for command in (cli.notify, cli.migrate):
        assert inspect.signature(command).parameters["manager"].default == HookOptions("vm1").manager


def test_topology_without_a_path_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    raw = _raw()
    raw["links"].remove(["sw-b", "fw-b"])
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "xfer.cli", "topology", "check", str(f)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr == "xfer: server 'hv2' has no path to its gateway 'gw'\n"
