"""``xfer bench dhcp``: DHCP snooping latency, transfer cost and datapath cost, same run.

Three scenarios, each against a baseline measured in the same run on the same lab
(a bridge in a namespace, veth ports, see ``xfer.lab.switch``):

- ``ack_to_enforceable``: a DHCPACK leaves the server; the client, as soon as it
  has it, sends from its new address until a packet passes the source guard.
  Baseline: the same exchange with no snooper attached. Target: under 5 ms.
- ``transfer_one_binding``: export of one VM's binding from switch A plus import
  into switch B, in process. Baseline: what the VM would otherwise need to pass
  B's guard, a DHCP REQUEST/ACK round trip with a real dnsmasq. Target: under 1 ms.
- ``throughput``: iperf3 TCP from the VM across its untrusted port, source guard
  on vs off (alternating runs, order swapped each round); seconds per GiB; target:
  on costs under 10 %. ``small_packets``: the same with 64-byte UDP datagrams,
  where the per-packet cost of the program shows (TCP rides on 64 KB GSO packets).
- ``datapath_per_packet``: the guard's cost per packet measured in the kernel with
  BPF_PROG_TEST_RUN (a million runs), against a program that only passes. Steady
  where iperf3 on a shared machine swings by more than the guard costs.

Every scenario reports ``baseline_s``, ``xfer_s`` and ``ratio`` (xfer / baseline).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xfer import netns
from xfer.bench import progrun
from xfer.bundle import Bundle
from xfer.dhcp import datapath, device, packet
from xfer.dhcp import transfer as dhcp_transfer
from xfer.dhcp.store import BindingTable, pin_dir
from xfer.lab.hosts import Hosts, stop_process
from xfer.lab.switch import (
    NET,
    SERVER_IP,
    SwitchNet,
    Wire,
    build_switch,
    client_frame,
    server_frame,
    start_dnsmasq,
    udp_frame,
)
from xfer.model import Kind, VmIdentity

Echo = Callable[[str], None] | None
IPERF_PORT = 5299
GIB_BITS = 8 * 2**30


def _is_dhcp_reply(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == b"\x00\x44"


def _ack_to_pass(vm: Wire, srv: Wire, ip: str, seq: int) -> float:
    """Seconds from the ACK leaving the server to the client's first packet passing."""
    mac = vm.mac
    vm.send(client_frame(mac, packet.build(1, packet.REQUEST, mac, requested=ip, xid=seq)))
    time.sleep(0.005)   # the REQUEST teaches the snooper the client's port (not timed)
    vm.drain()
    srv.drain()
    ack = server_frame(srv.mac, mac, packet.build(2, packet.ACK, mac, xid=seq, yiaddr=ip,
                                                  lease=600, server=SERVER_IP))
    token = f"bench-{seq}".encode()
    probe = udp_frame(mac, srv.mac, ip, SERVER_IP, 40000, 40001, token)
    started = time.perf_counter()
    srv.send(ack)
    if vm.wait_for(_is_dhcp_reply, 1.0) is None:
        raise RuntimeError("the DHCPACK never reached the client")
    while True:
        vm.send(probe)
        if srv.wait_for(lambda f: token in f, 0.0005) is not None:
            return time.perf_counter() - started
        if time.perf_counter() - started > 0.5:
            raise RuntimeError(f"no packet from {ip} passed within 0.5 s of its ACK")


def _request_ack(vm: Wire, ip: str, seq: int) -> float:
    """A DHCP REQUEST/ACK round trip with the real server (the VM renewing its lease)."""
    vm.drain()
    req = client_frame(vm.mac, packet.build(1, packet.REQUEST, vm.mac, requested=ip, xid=seq))
    started = time.perf_counter()
    vm.send(req)
    if vm.wait_for(lambda f: _is_dhcp_reply(f) and seq.to_bytes(4, "big") in f[46:50],
                   1.0) is None:
        raise RuntimeError("dnsmasq did not answer the REQUEST")
    return time.perf_counter() - started


def _iperf(hosts: Hosts, vm_ns: str, seconds: float, small_udp: bool = False) -> float:
    """One iperf3 run from the VM: bits/s received (TCP), or packets/s received (64-byte UDP)."""
    extra = ["-u", "-b", "0", "-l", "64"] if small_udp else []
    proc = hosts.run(vm_ns, ["iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-t",
                             str(seconds), "-J", *extra], timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {proc.stdout[-300:]} {proc.stderr[-300:]}")
    end = json.loads(proc.stdout)["end"]
    if small_udp:
        got = end["sum"]["packets"] - end["sum"]["lost_packets"]
        return float(got) / float(end["sum"]["seconds"])
    return float(end["sum_received"]["bits_per_second"])


@contextmanager
def _lab(state_dir: Path) -> Iterator[tuple[Hosts, SwitchNet, SwitchNet]]:
    saved = os.environ.get("XFER_DHCP_STATE_DIR")
    os.environ["XFER_DHCP_STATE_DIR"] = str(state_dir)   # keep /var/lib out of the bench
    hosts = Hosts(f"bd{os.getpid() % 100000}")
    try:
        a = build_switch(hosts, ("vm",), "a")
        b = build_switch(hosts, ("vm",), "b")
        yield hosts, a, b
    finally:
        for ns in list(hosts.namespaces):
            datapath.detach(ns, purge=True)
            datapath.unpin(pin_dir(ns))
        hosts.close()
        if saved is None:
            os.environ.pop("XFER_DHCP_STATE_DIR", None)
        else:
            os.environ["XFER_DHCP_STATE_DIR"] = saved


def _on_off(hosts: Hosts, net: SwitchNet, port: str, seconds: float, rounds: int,
            small: bool) -> tuple[list[float], list[float]]:
    """Alternate guard-off and guard-on runs (order swapped each round, against drift)."""
    on: list[float] = []
    off: list[float] = []
    for r in range(rounds):
        for guarded in ((False, True) if r % 2 == 0 else (True, False)):
            if guarded:
                device.attach(net.sw, ["uplink"], [port])
            else:
                datapath.detach(net.sw)
            (on if guarded else off).append(_iperf(hosts, net.vms["vm"], seconds, small))
    return on, off


def _per_packet(net: SwitchNet, port: str, mac: str, ip: str) -> dict[str, Any]:
    """BPF_PROG_TEST_RUN: the guard on a bound and a spoofed packet vs an empty program."""
    device.attach(net.sw, ["uplink"], [port])
    with netns.entered(net.sw):
        index = socket.if_nametoindex(port)
    bound = udp_frame(mac, packet.BROADCAST, ip, SERVER_IP, 40000, 40001, bytes(18))
    spoofed = udp_frame(mac, packet.BROADCAST, f"{NET}.250", SERVER_IP, 40000, 40001, bytes(18))
    fd = progrun.attached_program_fd(net.sw, port, datapath.PROGRAM.prio)
    try:
        guard_ns, verdict = progrun.ns_per_run(fd, bound, index, net.sw)
        drop_ns, drop_verdict = progrun.ns_per_run(fd, spoofed, index, net.sw)
    finally:
        os.close(fd)
    with progrun.trivial_program() as empty:
        empty_ns, _ = progrun.ns_per_run(empty, bound, index, net.sw)
    if (verdict, drop_verdict) != (progrun.TC_ACT_UNSPEC, 2):
        raise RuntimeError(f"unexpected verdicts {verdict}/{drop_verdict} (pass -1, drop 2)")
    return {"baseline_s": empty_ns / 1e9, "xfer_s": guard_ns / 1e9,
            "ratio": guard_ns / empty_ns if empty_ns else None,
            "guard_ns": guard_ns, "spoofed_drop_ns": drop_ns, "empty_program_ns": empty_ns,
            "note": "BPF_PROG_TEST_RUN, 1e6 runs on one 60-byte frame of a bound VM (passes) "
                    "and of a spoofed source (dropped); baseline: a program that only passes"}


def _scenario(baseline: list[float], xfer: list[float], **extra: Any) -> dict[str, Any]:
    b, x = statistics.median(baseline), statistics.median(xfer)
    return {"baseline_s": b, "xfer_s": x, "ratio": x / b if b else None, "runs": len(xfer),
            **extra}


def run(repeat: int = 20, seconds: float = 3.0, out: Path | None = None,
        echo: Echo = None, rounds: int = 4) -> dict[str, Any]:
    """Run the three scenarios; write ``out`` (JSON) and return the result.

    >>> run(repeat=5, seconds=1.0)["ack_to_enforceable"]["xfer_s"] < 0.005  # doctest: +SKIP
    True
    """
    say = echo or (lambda _: None)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, _lab(Path(tmp) / "db") as (hosts, a, b):
        port = SwitchNet.port("vm")
        # --- 1. ACK to enforceable ----------------------------------------------------
        base, guarded = [], []
        with Wire(a.vms["vm"], "eth0") as vm, Wire(a.srv, "eth0") as srv:
            for i in range(5):      # warm-up (sockets, caches, neighbour entries), not counted
                _ack_to_pass(vm, srv, f"{NET}.{10 + i}", 500 + i)
            for i in range(repeat):
                base.append(_ack_to_pass(vm, srv, f"{NET}.{10 + i}", 1000 + i))
            device.attach(a.sw, ["uplink"], [port])
            for i in range(5):
                _ack_to_pass(vm, srv, f"{NET}.{10 + i}", 1500 + i)
            for i in range(repeat):
                guarded.append(_ack_to_pass(vm, srv, f"{NET}.{10 + i}", 2000 + i))
            vm_mac, vm_ip = vm.mac, f"{NET}.{10 + repeat - 1}"
        result["ack_to_enforceable"] = _scenario(
            base, guarded, max_s=max(guarded), target_s=0.005,
            note="ACK sent by the server until the client's first packet from the new "
                 "address reaches the server; baseline without a snooper")
        say(f"ACK to enforceable: {guarded and statistics.median(guarded) * 1e3:.3f} ms "
            f"(no snooper {statistics.median(base) * 1e3:.3f} ms)")

        # --- 2. export + import of one VM's binding --------------------------------------
        device.attach(b.sw, ["uplink"], [port])
        start_dnsmasq(hosts, b.srv, "eth0", f"{NET}.100", f"{NET}.150", Path(tmp), "bench")
        vm_id = VmIdentity("vm", macs=(vm_mac,), ipv4=(vm_ip,))
        moves: list[float] = []
        persisted: list[float] = []
        for i in range(2 * repeat):
            started = time.perf_counter()
            section = dhcp_transfer.export_section(vm_id, a.sw)
            dhcp_transfer.import_section(section, Bundle(vm_id, {}, {Kind.DHCP: section}), b.sw,
                                         persist=bool(i % 2))
            (persisted if i % 2 else moves).append(time.perf_counter() - started)
        renewals = []
        with Wire(b.vms["vm"], "eth0") as bvm:
            for i in range(repeat):
                renewals.append(_request_ack(bvm, f"{NET}.120", 3000 + i))
        result["transfer_one_binding"] = _scenario(
            renewals, moves, target_s=0.001,
            with_database_write_s=statistics.median(persisted),
            note="export from A + import into B in process, until the binding is enforceable "
                 "at B (with_database_write_s adds rewriting B's snooping database file); "
                 "baseline: a DHCP REQUEST/ACK round trip with dnsmasq, the fastest way back "
                 "through B's guard without xfer, if the VM knew it had to renew")
        say(f"export+import of one binding: {statistics.median(moves) * 1e3:.3f} ms, "
            f"{statistics.median(persisted) * 1e3:.3f} ms with the database file "
            f"(DHCP renewal with dnsmasq {statistics.median(renewals) * 1e3:.3f} ms)")

        # --- 3. throughput, guard on vs off ---------------------------------------------------
        hosts.check(a.vms["vm"], ["ip", "addr", "add", f"{vm_ip}/24", "dev", "eth0"])
        server = hosts.spawn(a.srv, ["iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        try:
            for name, small in (("throughput", False), ("small_packets", True)):
                on_v, off_v = _on_off(hosts, a, port, seconds, rounds, small)
                on, off = statistics.median(on_v), statistics.median(off_v)
                unit = GIB_BITS if not small else 1e6
                result[name] = _scenario(
                    [unit / v for v in off_v], [unit / v for v in on_v],
                    guard_on=on, guard_off=off, per_run_on=on_v, per_run_off=off_v,
                    cost_pct=(1 - on / off) * 100, target_cost_pct=10.0,
                    note=("iperf3 TCP VM -> server across the untrusted port; *_s are seconds "
                          "per GiB, guard_* bits/s" if not small else
                          "iperf3 UDP, 64-byte payloads, unlimited rate; *_s are seconds per "
                          "million packets received, guard_* packets/s"))
                say(f"{name}: guard on {on:.4g}, off {off:.4g} {'pkt/s' if small else 'bit/s'} "
                    f"(cost {(1 - on / off) * 100:.1f} %)")
        finally:
            stop_process(server)
        result["datapath_per_packet"] = _per_packet(a, port, vm_mac, vm_ip)
        say(f"per packet in the kernel: guard {result['datapath_per_packet']['xfer_s'] * 1e9:.0f}"
            f" ns, an empty program {result['datapath_per_packet']['baseline_s'] * 1e9:.0f} ns")
        with BindingTable(a.sw) as table:   # the guard dropped nothing of the VM's own traffic
            result["guard_counters"] = table.counters().get(port, {})

    result["machine"] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                         "python": platform.python_version()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
