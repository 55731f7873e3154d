"""Per-VM counters with real traffic: exact counts, migration, idempotence, refusal.

Expectations count IP frames only (ARP is not counted; neighbours are static so
none is sent). Frame bytes run from the Ethernet header to the end of the IP
packet (no FCS): an ICMP echo with ping's 56-byte payload is 14 + 20 + 8 + 56 =
98 bytes over IPv4 and 14 + 40 + 8 + 56 = 118 over IPv6. A TCP transfer is
checked against an AF_PACKET witness on the same interface, frame by frame,
handshake and FIN exchange included; offloads are off so one skb is one frame.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_tests.counters_lab import (
    DEV,
    FW_IP4,
    FW_IP6,
    VM_IP4,
    VM_IP6,
    VM_MAC,
    Site,
    Witness,
    build_site,
    counting,
    tcp_transfer,
)
from xfer import bundle as bundle_mod
from xfer import netns
from xfer.bundle import Bundle
from xfer.counters import device as counters_device
from xfer.counters import model as counters
from xfer.ebpf import loader
from xfer.lab.hosts import Hosts
from xfer.model import Kind, parse_vm

XFER = [sys.executable, "-m", "xfer.cli"]
ZERO = dict.fromkeys(counters.FIELDS, 0)


def _xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XFER, *args], capture_output=True, text=True, timeout=120, check=False)


def _no_pins_left(*namespaces: str) -> None:
    for ns in namespaces:
        assert not (loader.PIN_ROOT / ns).exists(), f"pins left for {ns}"


def test_ping_counts_are_exact_over_ipv4_and_ipv6(hosts: Hosts) -> None:
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        site.ping(200, FW_IP4)
        site.ping(200, FW_IP6)
        totals = site.totals()
        assert totals[(VM_MAC, VM_IP4)] == {**ZERO, "tx_packets": 200, "tx_bytes": 200 * 98,
                                            "rx_packets": 200, "rx_bytes": 200 * 98}
        assert totals[(VM_MAC, VM_IP6)] == {**ZERO, "tx_packets": 200, "tx_bytes": 200 * 118,
                                            "rx_packets": 200, "rx_bytes": 200 * 118}
    _no_pins_left(site.fw)


_UDP_FLOOD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(18)
for _ in range(int(sys.argv[1])):
    s.sendto(payload, (sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_concurrent_traffic_on_every_cpu_is_counted_exactly(hosts: Hosts) -> None:
    """A UDP flood from a sender pinned to each CPU. veth runs the firewall's ingress on
    the sender's CPU, so the program updates one key from every CPU at once; plain
    (non-atomic) adds lose updates here. Each frame: 14 + 20 + 8 + 18 = 60 bytes."""
    per_cpu = 200_000
    cpus = sorted(os.sched_getaffinity(0))
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        with netns.entered(site.fw):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never read: no ICMP
        with sink:
            sink.bind((FW_IP4, 0))
            port = str(sink.getsockname()[1])
            # A loaded host may defer softirqs and overflow the backlog: veth counts
            # those drops (before tc ingress) as the VM side's tx_dropped.
            dropped = site.link_stat(site.vm, "eth0", "tx_dropped")
            procs = [subprocess.Popen(["ip", "netns", "exec", site.vm, "taskset", "-c", str(cpu),
                                       sys.executable, "-c", _UDP_FLOOD, str(per_cpu), FW_IP4,
                                       port]) for cpu in cpus]
            for proc in procs:
                assert proc.wait(timeout=120) == 0
            dropped = site.link_stat(site.vm, "eth0", "tx_dropped") - dropped
        delivered = per_cpu * len(cpus) - dropped
        got = site.totals()[(VM_MAC, VM_IP4)]
        assert (got["tx_packets"], got["tx_bytes"]) == (delivered, 60 * delivered)
    _no_pins_left(site.fw)


def test_tcp_transfer_counts_match_the_wire(hosts: Hosts) -> None:
    size = 1_000_000
    key = (VM_MAC, VM_IP4)
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        witness = Witness(site.fw, DEV)
        try:
            assert tcp_transfer(site.vm, site.fw, FW_IP4, size).received == size  # VM initiates
            assert tcp_transfer(site.fw, site.vm, VM_IP4, size).received == size  # VM accepts
            # A delayed ACK may still be on its way: compare once both stop moving.
            for _ in range(20):
                time.sleep(0.1)
                witness.drain()
                seen = dict(zip(counters.FIELDS, witness.table[key], strict=True))
                if site.totals()[key] == seen:
                    break
            assert witness.drops() == 0
        finally:
            witness.close()
        # The witness saw every payload byte of both transfers (1 MB each way): no frame missed.
        assert witness.tcp_payload[key] == 2 * size
        assert seen["tcp_initiated"] == 1 and seen["tcp_accepted"] == 1
        assert site.totals()[key] == seen
    _no_pins_left(site.fw)


def test_gso_aggregates_count_as_wire_segments(hosts: Hosts) -> None:
    """With offloads on, one skb carries up to 64 KB: counts must still be per wire segment.

    The witness is the endpoints' TCP stacks (TCP_INFO segs_out and bytes_sent). Frame
    sizes: SYN and SYN-ACK 74 bytes (14 Ethernet + 20 IPv4 + 40 TCP with options); every
    other segment 66 bytes of headers (TCP with timestamps) plus its payload.
    """
    size = 10_000_000
    site = build_site(hosts, "vm", "fw", offloads=True)
    with counting(site):
        skbs = Witness(site.fw, DEV)
        try:
            conv = tcp_transfer(site.vm, site.fw, FW_IP4, size)
            assert conv.received == size
            time.sleep(0.2)
            got = site.totals()[(VM_MAC, VM_IP4)]
            skbs.drain()
            tap_drops = skbs.drops()
        finally:
            skbs.close()
    assert tap_drops == 0, "the witness tap lost frames"
    if conv.retransmits:
        pytest.skip(f"{conv.retransmits} retransmissions (a loaded host dropped frames): "
                    "their SACK options make header sizes unpredictable")
    # The transfer really went as aggregates: the interface saw far fewer skbs than segments.
    assert skbs.table[(VM_MAC, VM_IP4)][0] < got["tx_packets"] // 4
    assert got["tcp_initiated"] == 1 and got["tcp_accepted"] == 0
    assert got["tx_packets"] == conv.client_segs_out
    assert got["tx_bytes"] == 74 + 66 * (conv.client_segs_out - 1) + conv.client_bytes_sent
    assert got["rx_packets"] == conv.server_segs_out + 1  # + the SYN-ACK
    # The other way go pure ACKs, never aggregated: the tap sees each frame as sent,
    # SACK options included (reordering on a loaded host adds them without any
    # retransmission, so a fixed 66-byte header would be a guess).
    tapped = skbs.table[(VM_MAC, VM_IP4)]
    assert (got["rx_packets"], got["rx_bytes"]) == (tapped[2], tapped[3])
    _no_pins_left(site.fw)


def test_detach_reattach_and_restart_keep_counts(hosts: Hosts) -> None:
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        site.attach()  # twice: still one filter per hook
        for hook in ("ingress", "egress"):
            shown = hosts.check(site.fw, ["tc", "filter", "show", "dev", DEV, hook])
            assert shown.count("direct-action") == 1, shown
        site.ping(5)
        assert counters_device.detach(DEV, site.fw) == 2
        assert counters_device.detach(DEV, site.fw) == 0  # nothing attached: fine
        site.ping(5)  # not counted
        site.attach()
        site.ping(5)
        # A new process (a restarted xfer) reads the same pinned counts.
        out = _xfer("counters", "show", "--vm", VM_IP4, "--netns", site.fw, "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [(r["mac"], r["ip"], r["tx_packets"], r["rx_packets"]) for r in rows] == [
            (VM_MAC, VM_IP4, 10, 10)]
    _no_pins_left(site.fw)


def test_migration_adds_counts_once(hosts: Hosts, tmp_path: Path) -> None:
    src = build_site(hosts, "vm", "fws")
    dst = build_site(hosts, "vmd", "fwd")  # the VM's new link: same MAC and addresses
    vm = f"{VM_IP4},{VM_IP6},{VM_MAC}"
    with counting(src), counting(dst):
        src.ping(20)
        src.ping(10, FW_IP6)
        tcp_transfer(src.vm, src.fw, FW_IP4, 100_000)
        dst.ping(3)  # the destination already counted some traffic of the VM
        before_src, before_dst = src.totals(), dst.totals()

        out = tmp_path / "vm.xfer"
        r = _xfer("export", "--vm", vm, "--kinds", "counters", "--netns", src.fw, "--out", str(out))
        assert r.returncode == 0, r.stderr
        r = _xfer("import", str(out), "--netns", dst.fw, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["created"] == 2
        expect = counters.rows(counters.add(
            {counters.make_key(*k): tuple(v.values()) for k, v in before_src.items()
             if k[1] in (VM_IP4, VM_IP6)},
            {counters.make_key(*k): tuple(v.values()) for k, v in before_dst.items()
             if k[1] in (VM_IP4, VM_IP6)}))
        shown = _xfer("counters", "show", "--vm", vm, "--netns", dst.fw, "--json")
        assert json.loads(shown.stdout) == expect

        again = _xfer("import", str(out), "--netns", dst.fw, "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["skipped"] == 2
        shown = _xfer("counters", "show", "--vm", vm, "--netns", dst.fw, "--json")
        assert json.loads(shown.stdout) == expect

        # The carried counts are pinned like the datapath's: detach, re-attach, a new process.
        assert counters_device.detach(DEV, dst.fw) == 2
        dst.attach()
        shown = _xfer("counters", "show", "--vm", vm, "--netns", dst.fw, "--json")
        assert json.loads(shown.stdout) == expect

        # Once the destination committed, the source forgets the VM.
        r = _xfer("forget", "--vm", vm, "--kinds", "counters", "--netns", src.fw)
        assert r.returncode == 0, r.stderr
        assert _xfer("counters", "show", "--vm", vm, "--netns", src.fw, "--json").stdout.strip() \
            == "[]"
    _no_pins_left(src.fw, dst.fw)


def _ping_both(site: Site) -> tuple[counters.Selection, counters.Selection]:
    """7 pings over IPv4, 3 over IPv6; the VM's selection, and one that makes reads dump the map."""
    site.ping(7)
    site.ping(3, FW_IP6)
    sel = counters.selection(parse_vm(f"{VM_IP4},{VM_IP6},{VM_MAC}", inventory={}))
    return sel, counters.Selection(None, sel.keyset, sel.test)


def test_per_key_path_matches_the_batch_path(hosts: Hosts) -> None:
    from xfer.counters import transfer as counters_transfer

    site = build_site(hosts, "vm", "fw")
    with counting(site):
        sel, scan = _ping_both(site)
        batched = counters_transfer.export_columns(scan, site.fw, batch=True)
        walked = counters_transfer.export_columns(scan, site.fw, batch=False)
        assert batched.table() == walked.table() == counters_transfer.export_columns(
            sel, site.fw).table()
        assert len(batched) == 2
        # Import through the per-key path: the carried counts equal what was sent.
        counters_transfer.import_columns(walked, "b1" * 16, site.fw, batch=False)
        counters_transfer.import_columns(walked, "b1" * 16, site.fw, batch=False)  # again: no-op
        doubled = counters.add(walked.table(), walked.table())
        assert counters_transfer.export_columns(sel, site.fw).table() == doubled
    _no_pins_left(site.fw)


def test_foreign_sections_are_refused_and_change_nothing(hosts: Hosts, tmp_path: Path) -> None:
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        site.ping(3)
        before = site.totals()[(VM_MAC, VM_IP4)]
        ours = parse_vm(f"{VM_IP4},{VM_MAC}", inventory={})
        other = parse_vm("10.9.0.77,02:00:00:00:00:77", inventory={})
        smuggled = {counters.make_key(VM_MAC, VM_IP4): (1,) * 6,
                    counters.make_key("02:00:00:00:00:77", "10.9.0.77"): (10**6,) * 6}
        cases = {
            "other-vm": Bundle(ours, {}, {Kind.COUNTERS: counters.encode_section(
                other, counters.Columns())}),
            "foreign-entry": Bundle(ours, {}, {Kind.COUNTERS: counters.encode_section(
                ours, counters.Columns.of(smuggled))}),
        }
        for name, b in cases.items():
            path = tmp_path / f"{name}.xfer"
            bundle_mod.write(path, b)
            r = _xfer("import", str(path), "--netns", site.fw)
            assert r.returncode == 1, (name, r.stdout, r.stderr)
            assert "not" in r.stderr and r.stderr.count("\n") == 1, r.stderr
            # (The IPv6 stack's own link-local chatter keeps counting: compare the VM's key.)
            after = site.totals()
            assert after[(VM_MAC, VM_IP4)] == before
            assert ("02:00:00:00:00:77", "10.9.0.77") not in after
    _no_pins_left(site.fw)


@pytest.mark.skipif(not os.path.exists("/usr/bin/ip"), reason="needs iproute2")
def test_attach_errors_are_one_line(hosts: Hosts) -> None:
    site = build_site(hosts, "vm", "fw")
    try:
        r = _xfer("counters", "attach", "--dev", "nosuchif", "--netns", site.fw)
        assert r.returncode == 1 and r.stderr.startswith("xfer: ") and r.stderr.count("\n") == 1
        assert "nosuchif" in r.stderr
        r = _xfer("counters", "show", "--netns", "xfer-no-such-ns")
        assert r.returncode == 1 and "not found" in r.stderr
        r = _xfer("counters", "show", "--netns", site.fw)
        assert r.returncode == 2 and "attach" in r.stderr  # nothing counts there yet
        r = _xfer("export", "--vm", VM_IP4, "--kinds", "counters", "--netns", site.fw,
                  "--out", "/dev/null")
        assert r.returncode == 2 and "attach" in r.stderr
    finally:
        loader.unpin(counters_device.PROGRAM, "nosuchif", site.fw)
    _no_pins_left(site.fw)


_UDP_FROM_EACH = """
import socket, sys
port, fw4, fw6, addrs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
for i, addr in enumerate(addrs):
    v6 = ":" in addr
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    for _ in range(1 + i % 3):
        s.sendto(bytes(10 + i % 7), (fw6 if v6 else fw4, port))
    s.close()
"""


def _send_from_each(site: Site, addrs: list[str]) -> dict[tuple[str, str], dict[str, int]]:
    """Address i sends 1 + i % 3 datagrams of 10 + i % 7 bytes to a firewall socket that
    never reads (so nothing comes back); returns the expected tx counts per key."""
    with netns.entered(site.fw):
        sinks = [socket.socket(family, socket.SOCK_DGRAM)
                 for family in (socket.AF_INET, socket.AF_INET6)]
    try:
        sinks[0].bind((FW_IP4, 0))
        port = sinks[0].getsockname()[1]
        sinks[1].bind((FW_IP6, port))
        site.hosts.check(site.vm, [sys.executable, "-c", _UDP_FROM_EACH, str(port), FW_IP4, FW_IP6,
                                   *addrs], timeout=120)
    finally:
        for sink in sinks:
            sink.close()
    expect = {}
    for i, addr in enumerate(addrs):
        frames = 1 + i % 3
        header = 14 + (40 if ":" in addr else 20) + 8
        expect[(VM_MAC, addr)] = {**ZERO, "tx_packets": frames,
                                  "tx_bytes": frames * (header + 10 + i % 7)}
    return expect


def _many_addresses(site: Site, n: int) -> list[str]:
    v4 = [f"10.9.{1 + i // 250}.{1 + i % 250}" for i in range(n)]
    v6 = [f"fd00:9::1:{i:x}" for i in range(n)]
    site.hosts.addresses(site.vm, "eth0", [f"{a}/32" for a in v4] + [f"{a}/128" for a in v6])
    return v4 + v6


def _plus(*tables: dict[tuple[str, str], dict[str, int]]) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for table in tables:
        for key, row in table.items():
            have = out.setdefault(key, dict(ZERO))
            for f, n in row.items():
                have[f] += n
    return out


def test_bulk_move_of_a_vm_with_600_addresses_is_exact(hosts: Hosts, tmp_path: Path) -> None:
    """600 keys: over counters.BULK, so the source's selection, the destination's check of
    the section and the second import's merge all take the numpy paths. Real traffic from
    every address; the destination adds each bundle once to what it counted itself."""
    src = build_site(hosts, "vm", "fws")
    dst = build_site(hosts, "vmd", "fwd")
    with counting(src), counting(dst):
        addrs = _many_addresses(src, 300)
        _many_addresses(dst, 300)
        sent_1 = _send_from_each(src, addrs)
        own = _send_from_each(dst, addrs[:100])  # the destination counted some already
        assert len(counters.vm_keys(parse_vm(",".join([VM_MAC, *addrs]), inventory={}),
                                    counters.KEYSET_LIMIT) or ()) >= counters.BULK
        vm = ",".join([VM_MAC, *addrs])
        mine = set(sent_1)

        def shown(ns: str) -> dict[tuple[str, str], dict[str, int]]:
            r = _xfer("counters", "show", "--vm", vm, "--netns", ns, "--json")
            assert r.returncode == 0, r.stderr
            return {(x["mac"], x["ip"]): {f: x[f] for f in counters.FIELDS}
                    for x in json.loads(r.stdout)}

        assert {k: v for k, v in src.totals().items() if k in mine} == sent_1
        out = tmp_path / "one.xfer"
        r = _xfer("export", "--vm", vm, "--kinds", "counters", "--netns", src.fw, "--out", str(out))
        assert r.returncode == 0, r.stderr
        r = _xfer("import", str(out), "--netns", dst.fw, "--json")
        assert r.returncode == 0, r.stderr
        assert (json.loads(r.stdout)["created"], json.loads(r.stdout)["updated"]) == (600, 0)
        assert shown(dst.fw) == _plus(own, sent_1)

        # A second bundle of the same VM (more traffic since): merged key by key.
        sent_2 = _send_from_each(src, addrs)
        out2 = tmp_path / "two.xfer"
        r = _xfer("export", "--vm", vm, "--kinds", "counters", "--netns", src.fw,
                  "--out", str(out2))
        assert r.returncode == 0, r.stderr
        r = _xfer("import", str(out2), "--netns", dst.fw, "--json")
        assert r.returncode == 0, r.stderr
        assert (json.loads(r.stdout)["created"], json.loads(r.stdout)["updated"]) == (0, 600)
        assert shown(dst.fw) == _plus(own, sent_1, sent_1, sent_2)

        # The per-key path reads the same.
        from xfer.counters import transfer as counters_transfer

        sel = counters.selection(parse_vm(vm, inventory={}))
        assert counters_transfer.export_columns(sel, dst.fw, batch=False).table() == \
            counters_transfer.export_columns(sel, dst.fw).table()
    _no_pins_left(src.fw, dst.fw)


def test_a_kernel_refusing_batch_ops_gets_the_same_counts(hosts: Hosts,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch map syscalls answered EINVAL (as before Linux 5.6): every call falls back per key."""
    from xfer.counters import transfer as counters_transfer
    from xfer.ebpf import bpfsys

    site = build_site(hosts, "vm", "fw")
    with counting(site):
        sel, scan = _ping_both(site)
        want = counters_transfer.export_columns(scan, site.fw).table()
        real = bpfsys._bpf
        refused: list[int] = []

        def no_batch(cmd: int, attr: object) -> int:
            if cmd in (bpfsys.MAP_LOOKUP_BATCH, bpfsys.MAP_UPDATE_BATCH, bpfsys.MAP_DELETE_BATCH):
                refused.append(cmd)
                return -errno.EINVAL
            return real(cmd, attr)  # type: ignore[arg-type]

        monkeypatch.setattr(bpfsys, "_bpf", no_batch)
        assert counters_transfer.export_columns(scan, site.fw).table() == want
        walked = counters_transfer.export_columns(scan, site.fw)
        counters_transfer.import_columns(walked, "c1" * 16, site.fw)  # page writes, per page
        assert counters_transfer.export_columns(scan, site.fw).table() == \
            counters.add(want, want)
        report = counters_transfer.forget(parse_vm(f"{VM_IP4},{VM_IP6},{VM_MAC}",
                                                   inventory={}), site.fw)
        assert report.deleted == 4  # two datapath keys, two carried
        assert set(refused) == {bpfsys.MAP_LOOKUP_BATCH, bpfsys.MAP_UPDATE_BATCH,
                                bpfsys.MAP_DELETE_BATCH}
        monkeypatch.undo()
        assert counters_transfer.export_columns(sel, site.fw).table() == {}
    _no_pins_left(site.fw)


def test_failed_imports_leave_the_counts_as_they_were(hosts: Hosts,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure before the commit changes nothing (and the bundle can come again); one
    after it, recording the bundle id, is undone by committing the old half back."""
    from xfer.counters import transfer as counters_transfer
    from xfer.counters.maps import CarriedCounters, ImportedBundles
    from xfer.errors import ImportFailed, KernelError

    site = build_site(hosts, "vm", "fw")
    with counting(site):
        site.ping(4)
        sel = counters.selection(parse_vm(f"{VM_IP4},{VM_MAC}", inventory={}))
        cols = counters_transfer.export_columns(sel, site.fw)
        before = counters_transfer.export_columns(sel, site.fw).table()

        def broken(self: CarriedCounters, state: object) -> None:
            raise KernelError(errno.EIO, "commit")

        with monkeypatch.context() as m:
            m.setattr(CarriedCounters, "commit", broken)
            with pytest.raises(ImportFailed, match="nothing changed"):
                counters_transfer.import_columns(cols, "d1" * 16, site.fw)
        assert counters_transfer.export_columns(sel, site.fw).table() == before
        counters_transfer.import_columns(cols, "d1" * 16, site.fw)  # not recorded: goes in now
        doubled = counters.add(before, cols.table())
        assert counters_transfer.export_columns(sel, site.fw).table() == doubled

        with monkeypatch.context() as m:  # the id is taken by the time it is recorded
            m.setattr(ImportedBundles, "seen", lambda self, bundle_id: False)
            with pytest.raises(ImportFailed, match="rolled back") as err:
                counters_transfer.import_columns(cols, "d1" * 16, site.fw)
        assert err.value.report.rolled_back  # type: ignore[attr-defined]
        assert counters_transfer.export_columns(sel, site.fw).table() == doubled
    _no_pins_left(site.fw)


def test_attach_adopts_the_carried_counts_of_an_older_build(hosts: Hosts) -> None:
    """Older builds pinned carried counts as a hash, xfer_ctr_base: attach folds them into
    the carried table once and removes the pin, so an upgrade loses no count."""
    bcc = pytest.importorskip("bcc")
    from xfer.ebpf.bpfsys import BpfMap

    site = build_site(hosts, "vm", "fw")
    pins = loader.pin_dir(DEV, site.fw)
    old = pins / counters_device.OLD_CARRIED
    carried = (1, 2, 3, 4, 5, 6)
    try:
        loader.ensure_bpffs()
        pins.mkdir(parents=True, exist_ok=True)
        with loader.source_file("xfer_maps.h") as header:
            older = bcc.BPF(text=f"""#include "xfer_maps.h"
BPF_TABLE_PINNED("hash", struct xfer_ctr_key, struct xfer_ctr_val, base, 65536, "{old}");
""".encode(), cflags=[f"-I{header.parent}"])
        older.cleanup()  # the pin keeps the map
        with BpfMap.open_pinned(str(old)) as m:
            m.update(counters.make_key(VM_MAC, VM_IP4), counters.VALUE.pack(*carried))
        site.attach()
        assert not old.exists()
        site.ping(3)
        counted = {**ZERO, "tx_packets": 3, "tx_bytes": 3 * 98, "rx_packets": 3, "rx_bytes": 3 * 98}
        want = {f: counted[f] + n for f, n in zip(counters.FIELDS, carried, strict=True)}
        assert site.totals()[(VM_MAC, VM_IP4)] == want
        site.attach()  # again: nothing is added twice
        assert site.totals()[(VM_MAC, VM_IP4)] == want
    finally:
        counters_device.detach(DEV, site.fw, unpin=True)
    _no_pins_left(site.fw)
