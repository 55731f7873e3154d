"""Killing the destination agent in the middle of an import loses nothing and opens nothing.

Deterministic "middle": a push of 200,000 entries takes the destination kernel
most of a second to apply; the test watches the destination's table and kills
the agent (SIGKILL) once a first part has arrived. The kernel keeps what it
applied so far — conntrack(8) shows a partial table — so the restarted agent
must roll it back from its journal: afterwards the destination holds none of
the VM's entries, the source all of them, and a new push moves everything.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from xfer.bench.conntrack import fill
from xfer.lab.agents import DST_AGENT_IP, SRC_AGENT_IP, XFER, LabAgents
from xfer.lab.hosts import Hosts

VM_IP = "10.0.1.2"
TOTAL = 200_000


def _vm_entries(hosts: Hosts, ns: str) -> int:
    """The VM's entries as conntrack(8) lists them (the independent witness)."""
    out = hosts.run(ns, ["conntrack", "-L", "-s", VM_IP], timeout=60).stdout
    return sum(1 for line in out.splitlines() if f"src={VM_IP} " in line)


def _table_count(hosts: Hosts, ns: str) -> int:
    return int(hosts.read_sysctl(ns, "net/netfilter/nf_conntrack_count"))


def test_killed_destination_agent_leaves_nothing_after_restart(hosts: Hosts) -> None:
    src, dst = hosts.add("src"), hosts.add("dst")
    fill(src, TOTAL, TOTAL, VM_IP)
    with tempfile.TemporaryDirectory(prefix="xfer-agent-crash-") as tmp:
        agents = LabAgents(hosts, Path(tmp))
        agents.link(src, dst)
        a_src = agents.start("fw-src", src, SRC_AGENT_IP, ["conntrack"])
        a_dst = agents.start("fw-dst", dst, DST_AGENT_IP, ["conntrack"])
        push = hosts.spawn(src, [*XFER, "agent", "push", *agents.client_args(a_src.url), "--vm", VM_IP,
                                 "--to", a_dst.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Part of the bundle has reached the destination kernel: kill now.
        deadline = time.monotonic() + 60
        while _table_count(hosts, dst) < 1000:
            assert time.monotonic() < deadline, "the import never started"
            assert push.poll() is None, "the push ended before the import started"
            time.sleep(0.002)
        a_dst.kill()
        _, err = push.communicate(timeout=60)
        assert push.returncode == 1, err
        partial = _vm_entries(hosts, dst)
        print(f"destination held {partial} of {TOTAL} entries when its agent died")
        assert 0 < partial < TOTAL, "the kill did not land in the middle of the import"
        markers = list((Path(tmp) / "state-fw-dst").glob("import-*.json"))
        assert len(markers) == 1, "the import left no journal marker"

        a_dst.start()  # rolls back before it listens
        assert "rolled back unfinished import" in a_dst.log_text()
        assert _vm_entries(hosts, dst) == 0, "partial entries survived the restart"
        assert not list((Path(tmp) / "state-fw-dst").glob("import-*.json"))
        assert _vm_entries(hosts, src) == TOTAL, "the source lost entries"

        # The device is usable again: the same push now moves everything.
        out = hosts.run(src, [*XFER, "agent", "push", *agents.client_args(a_src.url), "--vm", VM_IP,
                              "--to", a_dst.url], timeout=120)
        assert out.returncode == 0, out.stderr
        assert _vm_entries(hosts, dst) == TOTAL
