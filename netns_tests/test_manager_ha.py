"""Issue 18: three managers on one etcd journal in the manager lab, one leading.

The leader is SIGKILLed while a migration stands with the destination firewall's
import committed and the destination switch's frozen (SIGSTOP) mid-import. Another
manager takes over within a few seconds and rolls the migration back as the journal
says (pending while the switch is frozen, done once it resumes); the client that
sent the migration, given the three URLs, learns it failed; the same message sent
again is answered from the journal and changes nothing; the next migration moves
everything through the new leader. Then etcd itself is restarted and the group goes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.manager_helpers import bindings, conntrack_has_vm, conversation, counters, needs_all_kinds
from xfer.lab.agents import XFER
from xfer.lab.manager_lab import DESTINATION, SOURCE, ManagerLab
from xfer.lab.topology import VM_IP

pytestmark = [needs_all_kinds,
              pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server not installed")]


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    with tempfile.TemporaryDirectory(prefix="xfer-ha-") as tmp:
        monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(Path(tmp) / "dhcp"))
        with ManagerLab(f"h{os.getpid() % 10000}", Path(tmp)) as lab:
            lab.up()
            lab.start_agents()
            lab.start_etcd()
            lab.start_manager_group(3)
            yield lab


def _wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _client(lab: ManagerLab) -> list[str]:
    args = lab.client_args()
    args[args.index("--manager") + 1] = lab.group_urls()
    return args


def test_the_leader_killed_mid_migration_another_takes_over_and_rolls_it_back(lab: ManagerLab) -> None:
    conversation(lab)
    before = counters(lab, "fwsrc")
    leader = lab.leader()
    switch = lab.agents["sw-dst"]
    assert switch.proc is not None and leader.proc is not None
    os.killpg(switch.proc.pid, signal.SIGSTOP)
    try:
        migrate = lab.hosts.spawn(lab.ns["mg"], [*XFER, "migrate", "vm1", "--from", SOURCE, "--to",
                                                 DESTINATION, "--mode", "relay", *_client(lab)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(lambda: conntrack_has_vm(lab, "fwdst"))   # the firewall's import committed
        _wait_for(lambda: bool(lab.migrations()) and any(
            p["name"] == "import" and p["device"] == "sw-dst" and p["ended"] is None
            for p in lab.migrations()[0]["phases"]))
        mid = lab.migrations()[0]["id"]
        leader.kill()
        killed = time.monotonic()
        new = lab.leader(timeout=15)     # the lease is 2 s: a few seconds, not more
        took = time.monotonic() - killed
        assert new is not leader
        # The switch is still frozen: the journal says pending, not done.
        _wait_for(lambda: lab.migrations()[0]["state"] == "rollback-pending")
        assert lab.migrations()[0]["outcome"] is None
        # The client followed the group: the new leader told it the migration failed.
        assert migrate.wait(60) == 1, "the operator was not told the migration failed"
    finally:
        os.killpg(switch.proc.pid, signal.SIGCONT)
    _wait_for(lambda: lab.migrations()[0]["outcome"] is not None, timeout=60)
    record = next(m for m in lab.migrations() if m["id"] == mid)
    assert record["outcome"] == "rolled-back" and "manager restarted" in record["error"], record
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    assert counters(lab, "fwdst") is None
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert counters(lab, "fwsrc") == before
    print(f"takeover: a new leader {took:.1f} s after the kill")

    # The next migration goes through the new leader; its copy is answered, not redone.
    first = lab.xfer("notify", "--vm", "vm1", "--indication", "not-running", "--direction", "out",
                     "--from", SOURCE, "--to", DESTINATION, "--mode", "relay", "--id", "ha-1", "--json",
                     *_client(lab))
    assert first.returncode == 0, first.stderr
    dst_before = counters(lab, "fwdst")
    urls = lab.group_urls().split(",")
    again = lab.xfer("notify", "--vm", "vm1", "--indication", "not-running", "--direction", "out",
                     "--from", SOURCE, "--to", DESTINATION, "--mode", "relay", "--id", "ha-1", "--json",
                     "--manager", ",".join(reversed(urls)), *_client(lab)[2:])
    assert again.returncode == 0 and '"duplicate": true' in again.stdout, again.stdout + again.stderr
    assert counters(lab, "fwdst") == dst_before and bindings(lab, "swdst") == [VM_IP]

    # etcd itself restarted: the group goes on (same leader or a new one).
    assert lab.etcd is not None
    lab.etcd.restart()
    lab.leader(timeout=20)
    report = lab.xfer("migrate", "vm1", "--from", DESTINATION, "--to", SOURCE, "--mode", "relay",
                      *_client(lab), "--json")
    assert report.returncode == 0 and '"committed"' in report.stdout, report.stderr
