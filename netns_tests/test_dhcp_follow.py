"""DHCP snooping follows ports that appear later (a VM's tap created when its QEMU starts).

The switch is attached with its trusted uplink and the pattern ``tap*``; a port
created afterwards must be snooped (untrusted, enforcing) without anyone running
``xfer dhcp attach`` again: a spoofer behind it is dropped, a real lease through
it becomes a binding on that port, and a removed port leaves the ``ports`` map.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import NET, SERVER_IP, SwitchLab, Wire, switches, udp_frame
from xfer.dhcp import datapath, device
from xfer.dhcp.follow import Followed, PortFollower
from xfer.dhcp.store import BindingTable
from xfer.ebpf import loader
from xfer.lab.hosts import Hosts


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ())) as (built,):
        yield built


def _new_port(lab: SwitchLab, short: str, port: str) -> str:
    """A VM namespace whose link appears on the switch now, as a hypervisor's tap does."""
    vm = lab.hosts.add(short)
    lab.vms[short] = vm
    lab.hosts.veth(vm, "eth0", lab.sw, port)
    lab.hosts.check(lab.sw, ["ip", "link", "set", port, "master", "br0"])
    return vm


def _wait_attached(lab: SwitchLab, port: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not loader.attached(datapath.PROGRAM, port, lab.sw):
        assert time.monotonic() < deadline, f"{port} was never snooped"
        time.sleep(0.02)


def test_a_port_created_later_is_snooped_and_enforces(lab: SwitchLab) -> None:
    report = device.attach(lab.sw, ["uplink"], ["tap*"])   # nothing matches yet
    assert list(report.ports) == ["uplink"]
    seen: list[Followed] = []
    with PortFollower(lab.sw, ["tap*"], trusted=["uplink"], on_attach=seen.append) as follower:
        vm = _new_port(lab, "late", "tap-late")
        _wait_attached(lab, "tap-late")
        assert [f.name for f in seen] == ["tap-late"]
        latency = seen[0].latency_s
        assert latency is not None
        print(f"tap-late snooped {latency * 1000:.2f} ms after its RTM_NEWLINK")
        ports = {p.name: (p.role, p.mode) for p in BindingTable(lab.sw).ports()}
        assert ports["tap-late"] == ("untrusted", "enforce")
        assert ports["uplink"] == ("trusted", "enforce")
        assert "uplink" not in {f.name for f in follower.attached.values()}

        # A spoofer behind the new port is dropped ...
        lab.hosts.link_up(vm, "eth0")
        vm_wire, srv_wire = Wire(vm, "eth0"), Wire(lab.srv, "eth0")
        try:
            srv_wire.drain()
            vm_wire.send(udp_frame(vm_wire.mac, srv_wire.mac, f"{NET}.77", SERVER_IP, 4000, 4001,
                                   b"spoofed"))
            assert srv_wire.wait_for(lambda f: b"spoofed" in f, 0.5) is None
        finally:
            vm_wire.close()
            srv_wire.close()
        assert lab.counters("tap-late").get("drop_source", 0) >= 1

        # ... and a real lease through it binds the VM to that port.
        lab.dnsmasq(lab.srv, "eth0", f"{NET}.100", f"{NET}.150", "follow")
        lab.dhclient("late")
        ip = lab.vm_ip("late")
        rows = lab.bindings()
        assert [(r["ip"], r["port"]) for r in rows] == [(ip, "tap-late")]
        assert lab.ping("late")


def test_a_removed_port_leaves_the_ports_map_and_ports_that_do_not_match_are_left_alone(
        lab: SwitchLab) -> None:
    device.attach(lab.sw, ["uplink"], ["tap*"])
    with PortFollower(lab.sw, ["tap*"], trusted=["uplink"]) as follower:
        _new_port(lab, "other", "veth-other")
        _new_port(lab, "gone", "tap-gone")
        _wait_attached(lab, "tap-gone")
        assert not loader.attached(datapath.PROGRAM, "veth-other", lab.sw)
        index = next(i for i, f in follower.attached.items() if f.name == "tap-gone")
        lab.hosts.check(lab.sw, ["ip", "link", "del", "tap-gone"])
        deadline = time.monotonic() + 5
        while index in follower.attached:
            assert time.monotonic() < deadline, "the removed port is still followed"
            time.sleep(0.01)
        assert {p.name for p in BindingTable(lab.sw).ports()} == {"uplink"}


def test_ports_present_at_start_are_attached_too(lab: SwitchLab) -> None:
    device.attach(lab.sw, ["uplink"], ["tap*"])
    _new_port(lab, "early", "tap-early")    # before the follower starts
    with PortFollower(lab.sw, ["tap*"], trusted=["uplink"]) as follower:
        assert [f.name for f in follower.attached.values()] == ["tap-early"]
        assert loader.attached(datapath.PROGRAM, "tap-early", lab.sw) == ("ingress",)


def test_the_cli_follows_until_told_to_stop(lab: SwitchLab) -> None:
    import json
    import subprocess
    import sys

    from xfer.lab.hosts import stop_process

    proc = subprocess.Popen([sys.executable, "-m", "xfer.cli", "dhcp", "attach", "--netns", lab.sw,
                             "--trusted", "uplink", "--untrusted", "tap*", "--follow", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        report = ""
        while not report.endswith("}\n"):                  # the attach report (indented JSON)
            report += proc.stdout.readline()
        assert list(json.loads(report)["ports"]) == ["uplink"]
        # Created while the follower may still compile: found by its listing or its events.
        _new_port(lab, "cli", "tap-cli")
        line = json.loads(proc.stdout.readline())
        assert line["port"] == "tap-cli"
        assert loader.attached(datapath.PROGRAM, "tap-cli", lab.sw) == ("ingress",)
    finally:
        stop_process(proc)  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def _port_limits(lab: SwitchLab) -> dict[str, int | None]:
    with BindingTable(lab.sw) as table:
        return {p.name: p.max_bindings for p in table.ports() if p.role == "untrusted"}


def test_a_followed_port_gets_the_per_port_binding_limit(lab: SwitchLab) -> None:
    # A port that appears later is as hostile as one named at attach: same limit.
    device.attach(lab.sw, ["uplink"], ["tap*"], max_bindings=3)
    with PortFollower(lab.sw, ["tap*"], trusted=["uplink"], max_bindings=3):
        _new_port(lab, "lim", "tap-lim")
        _wait_attached(lab, "tap-lim")
        deadline = time.monotonic() + 5
        while "tap-lim" not in _port_limits(lab):
            assert time.monotonic() < deadline, "tap-lim never configured"
            time.sleep(0.02)
        assert _port_limits(lab)["tap-lim"] == 3


def test_an_agent_with_privsep_follows_new_ports_through_its_helper(
        lab: SwitchLab, tmp_path: Path) -> None:
    # The network-facing process cannot attach programs after dropping its capabilities:
    # the helper follows the configured patterns, with the configured limit.
    from xfer.lab.agents import SRC_AGENT_IP, LabAgents, device_toml

    agents = LabAgents(lab.hosts, tmp_path / "agents")
    agents.link(lab.sw, lab.hosts.add("peer"))
    (tmp_path / "agents").chmod(0o755)            # the unprivileged agent reaches its journal
    extra = (device_toml(trusted="uplink", untrusted=["tap*"]) + "max_bindings = 2\n"
             + '\n[privsep]\nuser = "nobody"\n')
    agent = agents.start("sw-agent", lab.sw, SRC_AGENT_IP, ["dhcp"], extra=extra)
    try:
        _new_port(lab, "pv", "tap-pv")
        _wait_attached(lab, "tap-pv", timeout=15)
        deadline = time.monotonic() + 5
        while "tap-pv" not in _port_limits(lab):
            assert time.monotonic() < deadline, "tap-pv never configured"
            time.sleep(0.02)
        assert _port_limits(lab)["tap-pv"] == 2
        status = (Path("/proc") / str(agent.proc.pid) / "status").read_text()
        assert "CapEff:\t0000000000000000" in status, "the network-facing process kept capabilities"
    finally:
        agent.stop()
