"""Benchmark of the counters kind: map transfer speed and datapath cost, baselines in the same run.

Scenarios (each reports ``baseline_s``/``xfer_s``/``ratio`` as the bench contract asks;
``ratio`` is baseline / xfer, so above 1 means xfer is faster):

* ``bulk``: export + import of ``vms`` VMs' counters (``keys_per_vm``: IPv4 and IPv6)
  between two devices: ``export_columns`` → section payload → ``unpack_payload``
  (every key checked against the VMs' key set) → ``import_columns``, the code under
  ``export_section``/``import_section``. Building the key set (and its numpy
  index) from the VM identities is setup, not timed. The destination starts
  without carried counts (the usual case), reset between runs. xfer = batch
  syscalls; baseline = per key (per page for the carried table). After every run
  (untimed) the destination must hold exactly source + its own counts for every
  key. ``steps``: medians of each stage timed alone (batch), ``runs_ms`` every run.
* ``bulk_merge``: the same, but both ends already carry counts for every key (the
  source from an earlier import, the destination from an earlier stay), so both
  ends merge 20,000 keys. No target; it shows what merging costs.
* ``one_vm``: export + import of one VM among ``vms``. xfer = keyed lookups (MAC
  known); baseline = the per-key walk of the map a MAC-less request falls back to.
  Each run checks that the destination's total grew by exactly what was exported.
* ``datapath``: iperf3 across the VM-facing veth, alternating runs without and with
  the program. Reports throughputs (``baseline_bps``, ``xfer_bps``), ``ratio`` =
  with / without and ``loss_pct``.

Needs root, iperf3 and bcc. Example::

    run(10_000, 5, 3.0, Path("bench/results/counters.json"), echo=print)
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer.bundle import Bundle
from xfer.counters import device as counters_device
from xfer.counters import model as counters
from xfer.counters import transfer as counters_transfer
from xfer.counters.maps import CounterMaps
from xfer.errors import UsageError, XferError
from xfer.lab.hosts import Hosts, have
from xfer.model import Kind, VmIdentity

Echo = Callable[[str], None] | None
DEV = "vmif"
SRC_IP, DST_IP = "10.77.0.2", "10.77.0.1"


class BenchMismatch(XferError):
    """A transfer left other counts at the destination than it should have."""



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


def _totals(ns: str, sel: counters.Selection) -> counters.Table:
    return counters_transfer.export_columns(sel, ns, dev=DEV).table()


def _set_carried(ns: str, cols: counters.Columns) -> None:
    """Make ``cols`` the carried table of ``ns`` (bench set-up and reset)."""
    with counters_device.open_maps(ns, DEV) as maps, counters_device.locked(maps):
        maps.carried.commit(maps.carried.stage(cols, maps.carried.state()))


def _expect_equal(got: counters.Table, want: counters.Table, what: str) -> None:
    if got != want:
        wrong = sum(1 for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        raise BenchMismatch(f"{what}: {wrong} of {len(want)} keys hold other counts than "
                            "source + destination")


def _bulk(sel: counters.Selection, src: str, dst: str, batch: bool,
          expect: counters.Table, carried: counters.Columns) -> float:
    """One bulk export + payload round trip + import; returns seconds (check, reset untimed)."""
    started = time.perf_counter()
    cols = counters_transfer.export_columns(sel, src, batch=batch)
    back = counters.unpack_payload(counters.pack_payload(cols), len(cols), sel, "fleet")
    counters_transfer.import_columns(back, uuid.uuid4().hex, dst, batch=batch)
    elapsed = time.perf_counter() - started
    _expect_equal(_totals(dst, sel), expect, f"bulk ({'batch' if batch else 'per key'})")
    _set_carried(dst, carried)
    return elapsed


@contextlib.contextmanager
def _timed(times: dict[str, list[float]], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    times.setdefault(name, []).append(time.perf_counter() - started)


def _steps(sel: counters.Selection, src: str, dst: str, repeat: int,
           carried: counters.Columns) -> dict[str, float]:
    """Each stage of the batch path timed alone: medians in ms (a profile, not the total)."""
    times: dict[str, list[float]] = {}
    for _ in range(repeat + 1):
        with counters_device.open_maps(src, DEV) as maps:
            with _timed(times, "export_live_dump"):
                live = maps.live.read_columns()
            with _timed(times, "export_carried_read"):
                table = maps.carried.read()
            with _timed(times, "export_select_sum"):
                cols = counters.add_columns(live.select(sel), table.select(sel))
        with _timed(times, "pack"):
            payload = counters.pack_payload(cols)
        with _timed(times, "unpack_check"):
            back = counters.unpack_payload(payload, len(cols), sel, "fleet")
        with _timed(times, "import"):
            counters_transfer.import_columns(back, uuid.uuid4().hex, dst)
        _set_carried(dst, carried)
    # The first round warms caches: left out.
    return {name: round(statistics.median(ts[1:]) * 1e3, 3) for name, ts in times.items()}


def _transfer(vm: VmIdentity, src: str, dst: str, batch: bool) -> float:
    """One export + bundle encode/decode + import; returns seconds (the check is untimed)."""
    sel = counters.selection(vm)
    before = _totals(dst, sel)
    started = time.perf_counter()
    section = counters_transfer.export_section(vm, src, batch=batch)
    data = bundle_mod.encode(Bundle(vm, {"netns": src}, {Kind.COUNTERS: section}))
    b = bundle_mod.decode(data)
    counters_transfer.import_section(b.sections[Kind.COUNTERS], b, dst, batch=batch)
    elapsed = time.perf_counter() - started
    sent = counters.decode_section(section, vm).table()
    _expect_equal(_totals(dst, sel), counters.add(before, sent), "one VM")
    return elapsed


def _runs(fn: Callable[[], float], repeat: int) -> list[float]:
    fn()  # warm: first calls page in code and create lock files
    return [fn() for _ in range(repeat)]


def _scenario(baseline: float, xfer: float, **extra: Any) -> dict[str, Any]:
    return {"baseline_s": round(baseline, 6), "xfer_s": round(xfer, 6),
            "ratio": round(baseline / xfer, 2) if xfer else None, **extra}


def _ms(runs: list[float]) -> list[float]:
    return [round(x * 1e3, 3) for x in runs]


def _iperf(hosts: Hosts, vm_ns: str, seconds: float) -> float:
    out = hosts.check(vm_ns, ["iperf3", "-c", DST_IP, "-t", str(seconds), "-J"],
                      timeout=seconds + 30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def _datapath(hosts: Hosts, vm_ns: str, src: str, repeat: int, seconds: float,
              say: Callable[[str], None]) -> dict[str, Any]:
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
    loss = round(100 * (1 - xfer_bps / base_bps), 2)
    say(f"  without {base_bps / 1e9:.2f} Gbit/s, with {xfer_bps / 1e9:.2f} Gbit/s: loss {loss:.1f}%")
    return {"baseline_bps": round(base_bps), "xfer_bps": round(xfer_bps),
            "ratio": round(xfer_bps / base_bps, 4), "loss_pct": loss,
            "runs_bps": {"without": [round(x) for x in without],
                         "with": [round(x) for x in with_prog]},
            "target": "loss < 10%"}


def _carried_for(sel: counters.Selection, counts: counters.Counts) -> counters.Columns:
    return counters.Columns.of(dict.fromkeys(sel.keyset or (), counts))


def _bulk_scenario(sel: counters.Selection, src: str, dst: str, repeat: int, merge: bool,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Batch and per-key runs of one bulk move, checked after each; ``merge``: both ends carry."""
    dst_carried = _carried_for(sel, (7, 700, 3, 300, 1, 0)) if merge else counters.Columns()
    _set_carried(src, _carried_for(sel, (5, 500, 5, 500, 0, 1)) if merge else counters.Columns())
    _set_carried(dst, dst_carried)
    expect = counters.add(_totals(src, sel), _totals(dst, sel))
    batch = _runs(lambda: _bulk(sel, src, dst, True, expect, dst_carried), repeat)
    per_key = _runs(lambda: _bulk(sel, src, dst, False, expect, dst_carried), repeat)
    steps = _steps(sel, src, dst, repeat, dst_carried)
    _set_carried(src, counters.Columns())
    _set_carried(dst, counters.Columns())
    med_batch, med_key = statistics.median(batch), statistics.median(per_key)
    out = _scenario(med_key, med_batch, runs_ms={"batch": _ms(batch), "per_key": _ms(per_key)},
                    steps_ms=steps, checked="destination = source + destination, every key, "
                    "after every run")
    say(f"  batch {med_batch * 1e3:.2f} ms (runs {min(batch) * 1e3:.2f}..{max(batch) * 1e3:.2f}), "
        f"per key {med_key * 1e3:.2f} ms ({out['ratio']}x)")
    say("  steps (ms, each alone): " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    return out


def run(vms: int, repeat: int, seconds: float, out: Path, echo: Echo = None,
        keys_per_vm: int = 2, datapath: bool = True) -> dict[str, Any]:
    """Run every scenario, write ``out`` and return the results.

    ``keys_per_vm``: 2 for dual-stack VMs (IPv4 + IPv6), 1 for IPv4 only;
    ``datapath``: False skips the iperf3 runs (quicker reruns of the transfer figures).
    """
    if keys_per_vm not in (1, 2):
        raise UsageError("--keys-per-vm is 1 (IPv4) or 2 (IPv4 + IPv6)")
    if os.geteuid() != 0:
        raise UsageError("xfer bench counters needs root (namespaces, BPF)")
    if datapath and not have("iperf3"):
        raise UsageError("xfer bench counters needs iperf3 (apt-get install iperf3)")
    say = echo or (lambda _m: None)
    fleet = _fleet(vms, keys_per_vm == 2)
    result: dict[str, Any] = {"vms": vms, "keys": keys_per_vm * vms, "repeat": repeat}
    with Hosts(f"xbc{os.getpid() % 10000}") as hosts:
        vm_ns, src, dst = hosts.add("vm"), hosts.add("src"), hosts.add("dst")
        hosts.veth(vm_ns, "eth0", src, DEV, f"{SRC_IP}/24", f"{DST_IP}/24")
        hosts.veth(dst, DEV, dst, "peer0")
        try:
            if datapath:
                result["datapath"] = _datapath(hosts, vm_ns, src, repeat, seconds, say)
            counters_device.attach(DEV, src)
            counters_device.attach(DEV, dst)
            with counters_device.open_maps(src, DEV) as maps:
                _seed(maps, fleet)
            everyone = counters.fleet_selection(fleet)
            if len(everyone.keyset or ()) > counters.LOOKUP_LIMIT:
                everyone.index  # noqa: B018 (built now: set-up, like the key set)
            say(f"bulk: export + import of {vms} VMs' counters ({keys_per_vm * vms} keys)")
            result["bulk"] = _bulk_scenario(everyone, src, dst, repeat, False, say)
            result["bulk"]["target"] = "xfer_s < 0.010"
            say("bulk_merge: the same with counts already carried at both ends")
            result["bulk_merge"] = _bulk_scenario(everyone, src, dst, repeat, True, say)

            one = fleet[vms // 2]
            ip_only = VmIdentity(one.id, (), one.ipv4, one.ipv6)
            say(f"one VM among {vms}: keyed lookups vs a per-key walk")
            keyed = _runs(lambda: _transfer(one, src, dst, True), max(repeat, 20))
            walk = _runs(lambda: _transfer(ip_only, src, dst, False), repeat)
            result["one_vm"] = _scenario(statistics.median(walk), statistics.median(keyed),
                                         runs_ms={"keyed": _ms(keyed), "walk": _ms(walk)},
                                         target="xfer_s < 0.001")
            say(f"  keyed {result['one_vm']['xfer_s'] * 1e3:.3f} ms, walk "
                f"{result['one_vm']['baseline_s'] * 1e3:.2f} ms ({result['one_vm']['ratio']}x)")
        finally:
            for ns in (src, dst):
                counters_device.detach(DEV, ns, unpin=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"results written to {out}")
    return result
