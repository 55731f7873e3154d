"""Privilege separation (issue 12.4): a process without capabilities moves state through
the privileged helper, and cannot touch the kernel itself.

A child process starts the helper while it is still root, drops every capability,
then exports, forgets and imports a VM's conntrack entries and counters through it
(checked with conntrack(8) and the counters maps), and is refused when it tries
ctnetlink, a namespace or a pinned BPF map on its own. It also times each operation
both ways (median of 21): the figures go to the report, not into assertions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from netns_tests.counters_lab import VM_IP4, VM_MAC, build_site, counting
from xfer.lab.hosts import Hosts

CHILD = r'''
import json, socket, statistics, sys, time
from xfer import netns
from xfer.agent.privsep import Helper, drop_capabilities, effective_capabilities
from xfer.errors import XferError
from xfer.model import Kind, parse_vm
from xfer import transfer
ns, vm_text = sys.argv[1], sys.argv[2]
vm = parse_vm(vm_text, inventory={})
kinds = [Kind.CONNTRACK, Kind.COUNTERS]
out = {}

def median_ms(fn, n=21):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)

out["direct_export_ms"] = median_ms(lambda: transfer.export_bundle(vm, kinds, ns))
helper = Helper.start(ns, kinds)          # while this process still holds its capabilities
drop_capabilities("nobody")
out["uid"] = __import__("os").getuid()
out["caps_after_drop"] = effective_capabilities()
out["helper_caps"] = effective_capabilities(helper.process.pid)

def refused(fn):
    try:
        fn()
    except (XferError, OSError) as exc:
        return type(exc).__name__
    return None

out["own_export"] = refused(lambda: transfer.export_bundle(vm, kinds, ns))
out["own_setns"] = refused(lambda: netns.entered(ns).__enter__())
from xfer.ebpf.bpfsys import BpfMap
out["own_bpf"] = refused(lambda: BpfMap.open_pinned(f"/run/xfer/bpf/{ns}/vmif/xfer_ctr"))

t = helper.transfer
bundle = t.export_bundle(vm, kinds, ns)
out["exported"] = {k.value: s.count for k, s in bundle.sections.items()}
out["helper_export_ms"] = median_ms(lambda: t.export_bundle(vm, kinds, ns))
forgot = t.forget(vm, [Kind.CONNTRACK], ns)
out["forgot"] = forgot[Kind.CONNTRACK].deleted
report = t.import_bundle(bundle, ns, vm=vm, kinds=[Kind.CONNTRACK])
out["imported"] = report.kinds[Kind.CONNTRACK].created
out["other_vm"] = refused(lambda: t.import_bundle(bundle, ns, vm=parse_vm("10.0.9.9", inventory={}),
                                                 kinds=[Kind.CONNTRACK]))
out["kind_not_held"] = refused(lambda: t.forget(vm, [Kind.DHCP], ns))
s = t.open_socket(socket.AF_INET)
out["socket_family"] = s.family == socket.AF_INET
out["dhcp_counters"] = t.dhcp_counters()
s.close()
# the cost the channel adds to a pause-window operation: a round trip without kernel work,
# and the bundle's encode + strict decode that the helper repeats
out["helper_noop_ms"] = median_ms(lambda: t._call({"op": "hello"}))
from xfer import bundle as bundle_mod
out["bundle_bytes"] = len(bundle_mod.encode(bundle))
out["encode_decode_ms"] = median_ms(lambda: bundle_mod.decode(bundle_mod.encode(bundle)))
helper.stop()
print(json.dumps(out))
'''


def test_a_process_without_capabilities_moves_state_through_the_helper(hosts: Hosts) -> None:
    site = build_site(hosts, "vm", "fw")
    with counting(site):
        site.ping(3)
        for sport in range(40000, 40005):
            hosts.check(site.fw, ["conntrack", "-I", "-s", VM_IP4, "-d", "10.9.0.1", "-p", "tcp",
                                  "--sport", str(sport), "--dport", "80", "--state", "ESTABLISHED",
                                  "-t", "300", "-u", "SEEN_REPLY,ASSURED"])
        proc = subprocess.run([sys.executable, "-c", CHILD, site.fw, f"{VM_IP4},{VM_MAC}"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.splitlines()[-1])
        print(out)
        assert out["caps_after_drop"] == 0
        assert out["helper_caps"] & (1 << 12) and out["helper_caps"] & (1 << 21)
        assert out["own_export"] and out["own_setns"] and out["own_bpf"]
        assert out["exported"]["conntrack"] >= 5 and out["exported"]["counters"] >= 1
        assert out["forgot"] >= 5 and out["imported"] == out["forgot"]
        assert out["uid"] != 0
        assert out["other_vm"] == "UsageError"          # as the direct import says it
        assert out["kind_not_held"] == "UsageError"
        assert out["socket_family"] and out["dhcp_counters"] == {}    # no snooper attached here
        listed = hosts.run(site.fw, ["conntrack", "-L", "-s", VM_IP4, "-p", "tcp"]).stderr
        assert int(re.search(r"(\d+) flow entries", listed).group(1)) >= 5  # type: ignore[union-attr]
