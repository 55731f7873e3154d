"""Killing the destination agent in the middle of an import loses nothing and opens nothing.

Deterministic "middle": a push of 200,000 entries takes the destination kernel
most of a second to apply; the test watches the destination's table and kills
the agent (SIGKILL) once a first part has arrived. The kernel keeps what it
applied so far — conntrack(8) shows a partial table — so the restarted agent
must roll it back from its journal: afterwards the destination holds none of
the VM's entries, the source all of them, and a new push moves everything.
A SIGTERM instead (``systemctl stop``) lets the import commit before the agent exits.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xfer.bench.conntrack import fill
from xfer.lab.agents import DST_AGENT_IP, SRC_AGENT_IP, XFER, AgentProcess, LabAgents
from xfer.lab.hosts import Hosts

VM_IP = "10.0.1.2"
TOTAL = 200_000


def _vm_entries(hosts: Hosts, ns: str) -> int:
    """The VM's entries as conntrack(8) lists them (the independent witness)."""
    out = hosts.run(ns, ["conntrack", "-L", "-s", VM_IP], timeout=60).stdout
    return sum(1 for line in out.splitlines() if f"src={VM_IP} " in line)


def _table_count(hosts: Hosts, ns: str) -> int:
    return int(hosts.read_sysctl(ns, "net/netfilter/nf_conntrack_count"))


@contextmanager
def _push_under_way(hosts: Hosts, tmp: Path) -> Iterator[tuple[LabAgents, AgentProcess, AgentProcess,
                                                             subprocess.Popen[bytes]]]:
    """Two agents and a push of TOTAL entries whose import has begun at the destination."""
    src, dst = hosts.add("src"), hosts.add("dst")
    fill(src, TOTAL, TOTAL, VM_IP)
    agents = LabAgents(hosts, tmp)
    agents.link(src, dst)
    a_src = agents.start("fw-src", src, SRC_AGENT_IP, ["conntrack"])
    a_dst = agents.start("fw-dst", dst, DST_AGENT_IP, ["conntrack"])
    push = hosts.spawn(src, [*XFER, "agent", "push", *agents.client_args(a_src.url), "--vm", VM_IP,
                             "--to", a_dst.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _table_count(hosts, dst) < 1000:
        assert time.monotonic() < deadline, "the import never started"
        assert push.poll() is None, "the push ended before the import started"
        time.sleep(0.002)
    yield agents, a_src, a_dst, push


def _markers(tmp: Path) -> list[Path]:
    return list((tmp / "state-fw-dst").glob("import-*.json"))


def test_killed_destination_agent_leaves_nothing_after_restart(hosts: Hosts) -> None:
    with tempfile.TemporaryDirectory(prefix="xfer-agent-crash-") as t, \
            _push_under_way(hosts, Path(t)) as (agents, a_src, a_dst, push):
        tmp, src, dst = Path(t), a_src.ns, a_dst.ns
        a_dst.kill()  # part of the bundle has reached the destination kernel
        _, err = push.communicate(timeout=60)
        assert push.returncode == 1, err
        partial = _vm_entries(hosts, dst)
        print(f"destination held {partial} of {TOTAL} entries when its agent died")
        assert 0 < partial < TOTAL, "the kill did not land in the middle of the import"
        assert len(_markers(tmp)) == 1, "the import left no journal marker"

        a_dst.start()  # rolls back before it listens
        assert "rolled back unfinished import" in a_dst.log_text()
        assert _vm_entries(hosts, dst) == 0, "partial entries survived the restart"
        assert not _markers(tmp)
        assert _vm_entries(hosts, src) == TOTAL, "the source lost entries"

        # The device is usable again: the same push now moves everything.
        out = hosts.run(src, [*XFER, "agent", "push", *agents.client_args(a_src.url), "--vm", VM_IP,
                              "--to", a_dst.url], timeout=120)
        assert out.returncode == 0, out.stderr
        assert _vm_entries(hosts, dst) == TOTAL


def test_stopped_destination_agent_finishes_the_import_first(hosts: Hosts) -> None:
    """SIGTERM (systemctl stop) in the middle of an import: the agent stops only once the
    import has committed, so the destination holds everything and no marker is left."""
    with tempfile.TemporaryDirectory(prefix="xfer-agent-stop-") as t, \
            _push_under_way(hosts, Path(t)) as (_, a_src, a_dst, push):
        assert a_dst.proc is not None
        a_dst.proc.send_signal(signal.SIGTERM)
        assert a_dst.proc.wait(60) == 0, a_dst.log_text()
        push.communicate(timeout=60)
        assert _vm_entries(hosts, a_dst.ns) == TOTAL
        assert not _markers(Path(t))
        assert _vm_entries(hosts, a_src.ns) == TOTAL
