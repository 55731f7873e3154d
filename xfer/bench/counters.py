"""Benchmark of the counters kind: map transfer speed and datapath cost, baselines in the same run.

Scenarios (each reports ``baseline_s``/``xfer_s``/``ratio`` as the bench contract asks;
``ratio`` is baseline / xfer, so above 1 means xfer is faster):

* ``bulk``: export + import of ``vms`` VMs' counters (``keys_per_vm``: IPv4 and IPv6)
  between two devices: ``export_columns`` → section payload → ``unpack_payload``
  (every key checked against the VMs' key set) → ``import_columns``, the code under
  ``export_section``/``import_section``. Building the key set from the VM identities
  is setup, not timed. The destination starts without carried counts for these VMs
  (the usual case), reset between runs. xfer = batch syscalls; baseline = per key.
* ``one_vm``: export + import of one VM among ``vms``. xfer = keyed lookups (MAC
  known); baseline = the per-key walk of the map a MAC-less request falls back to.
* ``datapath``: iperf3 across the VM-facing veth, alternating runs without and with
  the program. Reports throughputs (``baseline_bps``, ``xfer_bps``), ``ratio`` =
  with / without and ``loss_pct``.

Needs root, iperf3 and bcc. Example::

    run(10_000, 5, 3.0, Path("bench/results/counters.json"), echo=print)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer.bundle import Bundle
from xfer.ebpf import counters, counters_device, counters_transfer
from xfer.ebpf.counter_maps import CounterMaps
from xfer.errors import UsageError
from xfer.lab.hosts import Hosts, have
from xfer.model import Kind, VmIdentity

Echo = Callable[[str], None] | None
DEV = "vmif"
SRC_IP, DST_IP = "10.77.0.2", "10.77.0.1"


def _fleet(n: int, dual_stack: bool = True) -> list[VmIdentity]:
    """``n`` VMs, each with a MAC, an IPv4 and (``dual_stack``) an IPv6 address."""
    out = []
    for i in range(n):
        mac = "02:aa:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
        v4 = f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"
        out.append(VmIdentity(f"vm{i}", (mac,), (v4,), (f"fd00:77::{i:x}",) if dual_stack else ()))
    return out


def _seed(maps: CounterMaps, vms: list[VmIdentity]) -> None:
    """Give every VM datapath counts, as if it had sent and received traffic (bench only)."""
    table: counters.Table = {}
    for i, vm in enumerate(vms):
        for ip in vm.addresses:
            table[counters.make_key(vm.macs[0], ip)] = (i + 1, 98 * (i + 1), i, 98 * i, i % 7, 1)
    keys, values = counters.to_raw(table)
    maps.live.map.update_many(keys, values)


def _bulk(sel: counters.Selection, src: str, dst: str, batch: bool) -> float:
    """One bulk export + payload round trip + import; returns seconds (reset not timed)."""
    started = time.perf_counter()
    cols = counters_transfer.export_columns(sel, src, batch=batch)
    back = counters.unpack_payload(counters.pack_payload(cols), len(cols), sel, "fleet")
    counters_transfer.import_columns(back, uuid.uuid4().hex, dst, batch=batch)
    elapsed = time.perf_counter() - started
    with counters_device.open_maps(dst, DEV) as maps, counters_device.locked(maps):
        maps.carried.commit(maps.carried.stage(counters.Columns(), maps.carried.state()))
    return elapsed


def _transfer(vm: VmIdentity, src: str, dst: str, batch: bool) -> float:
    """One export + bundle encode/decode + import; returns seconds."""
    started = time.perf_counter()
    section = counters_transfer.export_section(vm, src, batch=batch)
    data = bundle_mod.encode(Bundle(vm, {"netns": src}, {Kind.COUNTERS: section}))
    b = bundle_mod.decode(data)
    counters_transfer.import_section(b.sections[Kind.COUNTERS], b, dst, batch=batch)
    return time.perf_counter() - started


def _median(fn: Callable[[], float], repeat: int) -> float:
    fn()  # warm: first calls page in code and create lock files
    return statistics.median(fn() for _ in range(repeat))


def _scenario(baseline: float, xfer: float, **extra: Any) -> dict[str, Any]:
    return {"baseline_s": round(baseline, 6), "xfer_s": round(xfer, 6),
            "ratio": round(baseline / xfer, 2) if xfer else None, **extra}


def _iperf(hosts: Hosts, vm_ns: str, seconds: float) -> float:
    out = hosts.check(vm_ns, ["iperf3", "-c", DST_IP, "-t", str(seconds), "-J"],
                      timeout=seconds + 30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def run(vms: int, repeat: int, seconds: float, out: Path, echo: Echo = None,
        keys_per_vm: int = 2) -> dict[str, Any]:
    """Run every scenario, write ``out`` and return the results.

    ``keys_per_vm``: 2 for dual-stack VMs (IPv4 + IPv6), 1 for IPv4 only.
    """
    if keys_per_vm not in (1, 2):
        raise UsageError("--keys-per-vm is 1 (IPv4) or 2 (IPv4 + IPv6)")
    if os.geteuid() != 0:
        raise UsageError("xfer bench counters needs root (namespaces, BPF)")
    if not have("iperf3"):
        raise UsageError("xfer bench counters needs iperf3 (apt-get install iperf3)")
    say = echo or (lambda _m: None)
    fleet = _fleet(vms, keys_per_vm == 2)
    result: dict[str, Any] = {"vms": vms, "keys": keys_per_vm * vms, "repeat": repeat}
    with Hosts(f"xbc{os.getpid() % 10000}") as hosts:
        vm_ns, src, dst = hosts.add("vm"), hosts.add("src"), hosts.add("dst")
        hosts.veth(vm_ns, "eth0", src, DEV, f"{SRC_IP}/24", f"{DST_IP}/24")
        hosts.veth(dst, DEV, dst, "peer0")
        try:
            say("datapath: iperf3 across the VM-facing veth, without and with the program")
            hosts.spawn(src, ["iperf3", "-s", "-B", DST_IP], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            without, with_prog = [], []
            for _ in range(max(1, repeat)):
                counters_device.detach(DEV, src)
                without.append(_iperf(hosts, vm_ns, seconds))
                counters_device.attach(DEV, src)
                with_prog.append(_iperf(hosts, vm_ns, seconds))
            base_bps, xfer_bps = statistics.median(without), statistics.median(with_prog)
            result["datapath"] = {
                "baseline_bps": round(base_bps), "xfer_bps": round(xfer_bps),
                "ratio": round(xfer_bps / base_bps, 4),
                "loss_pct": round(100 * (1 - xfer_bps / base_bps), 2),
                "runs_bps": {"without": [round(x) for x in without],
                             "with": [round(x) for x in with_prog]},
                "target": "loss < 10%",
            }
            say(f"  without {base_bps / 1e9:.2f} Gbit/s, with {xfer_bps / 1e9:.2f} Gbit/s: "
                f"loss {result['datapath']['loss_pct']:.1f}%")

            counters_device.attach(DEV, dst)
            with counters_device.open_maps(src, DEV) as maps:
                _seed(maps, fleet)
            everyone = counters.fleet_selection(fleet)
            say(f"bulk: export + import of {vms} VMs' counters ({keys_per_vm * vms} keys)")
            batch = _median(lambda: _bulk(everyone, src, dst, True), repeat)
            per_key = _median(lambda: _bulk(everyone, src, dst, False), repeat)
            result["bulk"] = _scenario(per_key, batch, target="xfer_s < 0.010")
            say(f"  batch {batch * 1e3:.2f} ms, per key {per_key * 1e3:.2f} ms "
                f"({result['bulk']['ratio']}x)")

            one = fleet[vms // 2]
            ip_only = VmIdentity(one.id, (), one.ipv4, one.ipv6)
            say(f"one VM among {vms}: keyed lookups vs a per-key walk")
            keyed = _median(lambda: _transfer(one, src, dst, True), max(repeat, 20))
            walk = _median(lambda: _transfer(ip_only, src, dst, False), repeat)
            result["one_vm"] = _scenario(walk, keyed, target="xfer_s < 0.001")
            say(f"  keyed {keyed * 1e3:.3f} ms, walk {walk * 1e3:.2f} ms "
                f"({result['one_vm']['ratio']}x)")
        finally:
            for ns in (src, dst):
                counters_device.detach(DEV, ns, unpin=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"results written to {out}")
    return result
