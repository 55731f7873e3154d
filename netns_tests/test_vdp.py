"""``xfer vdp serve`` against the real 802.1Qbg station, Debian's lldpad and vdptool.

The station namespace runs lldpad on ``s0``; the switch namespace's ``p1`` is the
other end of the veth, where the responder answers ECP and VDP. vdptool's output is
the witness of what the station understood (it reports "mode = deassoc" for a
request the bridge refused), and the station's own VSI table shows whether it kept
a VSI alive (it deletes one whose keep-alives go unanswered, after ~17 s).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.vdp_lab import (
    SERVER,
    STATION_PORT,
    SWITCH_PORT,
    Responder,
    Station,
    UdpManager,
    needs_lldpad,
)
from xfer import netns as xnetns
from xfer.lab.hosts import Hosts

pytestmark = needs_lldpad

VM_IN = ("a1b2c3d4-0000-4000-8000-000000000001", "52:54:00:aa:bb:01")
VM_OUT = ("a1b2c3d4-0000-4000-8000-000000000002", "52:54:00:aa:bb:02")


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path) -> Iterator[tuple[Hosts, Station, str]]:
    station_ns, switch_ns = hosts.add("vst"), hosts.add("vsw")
    hosts.veth(station_ns, STATION_PORT, switch_ns, SWITCH_PORT)
    # hosts' finalizer kills lldpad (its process group and anything left in the namespace).
    yield hosts, Station(hosts, station_ns, tmp_path), switch_ns


@pytest.fixture
def manager() -> Iterator[UdpManager]:
    stub = UdpManager()
    try:
        yield stub
    finally:
        stub.close()


def _inventory(tmp_path: Path) -> Path:
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[vm.web1]\nmac = "{VM_IN[1]}"\n\n[vm.db1]\nmac = "02:00:00:00:00:99"\n'
                   f'vsi = "{VM_OUT[0]}"\n')
    return inv


def test_both_hints_become_migration_messages(lab: tuple[Hosts, Station, str], manager: UdpManager,
                                              tmp_path: Path) -> None:
    hosts, station, switch_ns = lab
    vdp = Responder(hosts, switch_ns, tmp_path, "--udp", manager.address, inventory=_inventory(tmp_path))
    station.wait_usable()
    assert manager.received == []                  # an association without hints is no message

    answer = station.request(*VM_IN, hints="to")
    assert answer.answered and answer.mode == "assoc", answer.output
    answer = station.request(*VM_OUT, hints="from")
    assert answer.answered and answer.mode == "assoc", answer.output
    # Leaving: the de-association repeats the S-bit; the same migration, no second message.
    answer = station.request(*VM_OUT, mode="deassoc", hints="from")
    assert answer.answered and answer.mode == "deassoc", answer.output

    sent = vdp.messages()
    assert [(m["vm"], m["indication"], m["direction"], m["source"], m["destination"]) for m in sent] == [
        ("web1", "starting", "in", "", SERVER),       # named by its MAC in the inventory
        ("db1", "not-running", "out", SERVER, ""),    # named by its VSI UUID in the inventory
    ]
    assert [m["id"] for m in manager.received] == [m["id"] for m in sent]
    # Once its ports are open the responder holds no capability, in any of its threads.
    tasks = list(Path(f"/proc/{vdp.proc.pid}/task").iterdir())
    assert len(tasks) >= 2                         # the UDP sender's worker thread exists by now
    for task in tasks:
        caps = dict(line.split(":\t") for line in (task / "status").read_text().splitlines() if ":\t" in line)
        assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == int(caps["CapBnd"], 16) == 0, caps
    stopped = vdp.stop()
    assert stopped["counters"]["events"] == 2 and stopped["counters"].get("malformed", 0) == 0


def test_keepalives_answered_and_one_message(lab: tuple[Hosts, Station, str], manager: UdpManager,
                                             tmp_path: Path) -> None:
    hosts, station, switch_ns = lab
    vdp = Responder(hosts, switch_ns, tmp_path, "--udp", manager.address)
    station.wait_usable()
    answer = station.request(*VM_IN, hints="to")
    assert answer.mode == "assoc", answer.output
    # A repeated request of the same VSI and hint is the same event.
    assert station.request(*VM_IN, hints="to").mode == "assoc"
    started = time.monotonic()
    time.sleep(27)     # keep-alives every ~10.5 s; unanswered, the station drops the VSI after ~17 s
    assert station.associated(VM_IN[0]), "the station dropped the VSI: keep-alives went unanswered"
    stopped = vdp.stop()
    counters = stopped["counters"]
    assert counters["repeats"] >= 3, counters               # the repeat + >= 2 keep-alives in 27 s
    assert counters["events"] == 1 and len(vdp.messages()) == 1
    assert [m["vm"] for m in manager.received] == [VM_IN[1]]  # no inventory: named by its MAC
    # Each request and keep-alive got an ECP ACK and a VDP response the station ACKed in turn.
    assert counters["acks-sent"] == counters["requests"]
    assert counters["acks-received"] == counters["responses-sent"] >= 4
    assert time.monotonic() - started >= 25


def _raw(ns: str, ifname: str) -> socket.socket:
    with xnetns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8940))
    sock.bind((ifname, 0x8940))
    return sock


def test_malformed_and_truncated_frames_are_ignored_and_counted(lab: tuple[Hosts, Station, str],
                                                                 manager: UdpManager, tmp_path: Path) -> None:
    hosts, station, switch_ns = lab
    vdp = Responder(hosts, switch_ns, tmp_path, "--udp", manager.address)
    station.wait_usable()
    sock = _raw(station.ns, STATION_PORT)
    src = bytes.fromhex("020000000042")
    head = bytes.fromhex("0180c2000000") + src + b"\x89\x40"
    mgr_tlv = struct.pack("!H", (5 << 9) | 16) + b"blade5".ljust(16, b"\0")
    vsi_tlv = (struct.pack("!H", (3 << 9) | 33) + b"\x10" + bytes.fromhex("12d687") + b"\x03\x05"
               + bytes(range(16)) + b"\x02\x00\x01" + bytes.fromhex("525400aabb09") + b"\x00\x00")
    good = head + b"\x10\x01\x00\x07" + mgr_tlv + vsi_tlv
    bad = [
        good[:30],                                  # truncated inside the Manager ID TLV
        good[:-4],                                  # truncated inside the VSI TLV
        head + b"\x10",                             # no room for the ECP header
        head + b"\x30\x01\x00\x07" + mgr_tlv + vsi_tlv,     # ECP version 3
        head + b"\x10\x01\x00\x08" + vsi_tlv,       # VSI TLV without a Manager ID
        head + b"\x10\x01\x00\x09" + mgr_tlv + b"\x10\x05" + b"\xff" * 5,  # a TLV type VDP lacks
    ]
    try:
        for frame in bad:
            sock.send(frame)
    finally:
        sock.close()
    # Still alive and answering: the next real request is served.
    answer = station.request(*VM_IN, hints="to")
    assert answer.answered and answer.mode == "assoc", answer.output
    assert vdp.proc.poll() is None
    stopped = vdp.stop()
    counters = stopped["counters"]
    assert counters["malformed"] == len(bad), counters
    assert counters["malformed:truncated"] == 3, counters
    assert counters["malformed:bad-version"] == counters["malformed:unknown-tlv"] == 1, counters
    assert counters["events"] == 1 and len(manager.received) == 1
    assert any(r["reason"] == "truncated" for r in vdp.logs("malformed"))


def test_manager_down_or_refusing_is_an_error_to_the_station(lab: tuple[Hosts, Station, str],
                                                             manager: UdpManager, tmp_path: Path) -> None:
    hosts, station, switch_ns = lab
    with socket.socket() as s:                     # a port nobody listens on: the manager is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1/migrations"
    vdp = Responder(hosts, switch_ns, tmp_path, "--manager", down, "--timeout", "3", name="down")
    station.wait_usable()
    answer = station.request(*VM_IN, hints="to")
    assert answer.answered and answer.mode == "deassoc", answer.output   # the station was refused
    assert not station.associated(VM_IN[0])
    (event,) = vdp.logs("event")
    assert event["status"] == 3 and "error" in event                    # no VSI manager reachable
    vdp.stop()

    # A manager that answers "no": refused with a hard error; it is the same station, same port.
    manager.ok = False
    vdp = Responder(hosts, switch_ns, tmp_path, "--udp", manager.address, name="refusing")
    answer = station.request(*VM_OUT, hints="from")
    assert answer.answered and answer.mode == "deassoc", answer.output
    (event,) = vdp.logs("event")
    assert event["status"] == 4 and "not in the topology" in event["error"]
    # Once the manager takes it, the station's retry goes through.
    manager.ok = True
    answer = station.request(*VM_OUT, hints="from")
    assert answer.answered and answer.mode == "assoc", answer.output
    refused, retried = manager.received
    assert refused["vm"] == retried["vm"] == VM_OUT[1] and refused["id"] != retried["id"]
    vdp.stop()


def test_agent_with_a_vdp_section_answers_and_converts(lab: tuple[Hosts, Station, str], manager: UdpManager,
                                                       tmp_path: Path) -> None:
    import subprocess
    import sys

    from xfer import pki

    hosts, station, switch_ns = lab
    pki.init_ca(tmp_path / "pki")
    pki.issue(tmp_path / "pki", "sw1", ips=["127.0.0.1"])
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[device]\nid = "sw1"\ntype = "switch"\nkinds = ["conntrack"]\nnetns = "{switch_ns}"\n'
                    f'[listen]\naddress = "127.0.0.1"\nport = 17443\n'
                    f'[tls]\ncert = "pki/sw1.pem"\nkey = "pki/sw1.key"\nca = "pki/ca.pem"\n'
                    f'[state]\ndir = "{tmp_path / "state"}"\n'
                    f'[vdp]\nports = ["{SWITCH_PORT}"]\nserver = "{SERVER}"\nudp = "{manager.address}"\n')
    err = tmp_path / "agent.err"
    with open(err, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "xfer.cli", "agent", "serve", "--config", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    hosts.procs.append(agent)
    deadline = time.monotonic() + 20
    while '"serving"' not in err.read_text():
        assert agent.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)
    station.wait_usable()
    answer = station.request(*VM_IN, hints="to")
    assert answer.answered and answer.mode == "assoc", answer.output
    assert [(m["indication"], m["direction"], m["destination"]) for m in manager.received] == [
        ("starting", "in", SERVER)]
    assert '"device":"sw1"' in err.read_text() and '"vdp":"event"' in err.read_text()
    agent.terminate()
    assert agent.wait(10) == 0, err.read_text()


@pytest.mark.parametrize("stp", [0, 1])
def test_port_enslaved_to_a_linux_bridge(lab: tuple[Hosts, Station, str], manager: UdpManager,
                                         tmp_path: Path, stp: int) -> None:
    hosts, station, switch_ns = lab
    hosts.check(switch_ns, ["ip", "link", "add", "br0", "type", "bridge", "stp_state", str(stp)])
    hosts.check(switch_ns, ["ip", "link", "set", SWITCH_PORT, "master", "br0"])
    hosts.check(switch_ns, ["ip", "link", "set", "br0", "up"])
    vdp = Responder(hosts, switch_ns, tmp_path, "--udp", manager.address)
    station.wait_usable(timeout=40)
    answer = station.request(*VM_IN, hints="to")
    assert answer.answered and answer.mode == "assoc", answer.output
    assert len(manager.received) == 1
    vdp.stop()
