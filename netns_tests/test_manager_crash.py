"""A manager killed in the middle of a migration and restarted loses nothing.

The destination switch's agent is frozen (SIGSTOP) so that the migration stops
with the firewall's import committed and the switch's in flight; the manager is
then killed (SIGKILL) and the switch resumed. The restarted manager reads its journal, rolls back both
destinations, and leaves the source as it was; a new migration then moves
everything and the connection survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from netns_tests.manager_helpers import (
    bindings,
    conntrack_has_vm,
    conversation,
    counters,
    needs_all_kinds,
    running_lab,
)
from xfer.lab.agents import XFER
from xfer.lab.manager_lab import DESTINATION, SOURCE, ManagerLab
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import conversation_continues

pytestmark = needs_all_kinds


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch)


def _wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_mid_migration_the_restarted_manager_rolls_back_and_nothing_is_lost(lab: ManagerLab) -> None:
    vm, srv = conversation(lab)
    before = counters(lab, "fwsrc")
    switch, manager = lab.agents["sw-dst"], lab.manager
    assert switch.proc is not None and manager is not None and manager.proc is not None
    os.killpg(switch.proc.pid, signal.SIGSTOP)
    try:
        migrate = lab.hosts.spawn(lab.ns["mg"], [*XFER, "migrate", "vm1", "--from", SOURCE, "--to",
                                                 DESTINATION, "--mode", "relay", *lab.client_args()],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def switch_import_under_way() -> bool:
            runs = lab.migrations()
            return bool(runs) and any(p["name"] == "import" and p["device"] == "sw-dst" and p["ended"] is None
                                      for p in runs[0]["phases"])

        _wait_for(switch_import_under_way)
        _wait_for(lambda: conntrack_has_vm(lab, "fwdst"))   # the firewall's import committed
        manager.kill()
    finally:
        os.killpg(switch.proc.pid, signal.SIGCONT)
    assert migrate.wait(30) == 1, "the operator was not told the migration failed"
    # The switch may still finish an import it had fully received (its answer goes nowhere),
    # or have lost the request with the connection: either way the restart must undo it.
    time.sleep(1)
    assert lab.migrations()[0]["outcome"] is None   # the journal says: under way

    manager.start()
    assert '"event":"recovered"' in manager.log_text() and '"action":"rolling back"' in manager.log_text()
    record = lab.wait_outcome(lab.migrations()[0]["id"])
    assert record["outcome"] == "rolled-back" and "manager restarted" in record["error"]
    # Destinations as before the migration; the source as it was.
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    assert counters(lab, "fwdst") is None
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert counters(lab, "fwsrc") == before

    # Nothing lost: the next migration moves everything and the connection survives.
    report = lab.migrate("relay")
    assert report["state"] == "committed"
    lab.move_vm()
    assert conversation_continues(vm, srv, "after-restart"), "the connection died"
    assert counters(lab, "fwdst") is not None


def test_restarted_while_a_destination_is_frozen_it_listens_at_once_and_rolls_back_after(
        lab: ManagerLab) -> None:
    """Issue 12.1: killed while the switch's agent is frozen mid-import, restarted while it is still
    frozen. The manager listens at once, journals the rollback as pending (not done), and does it
    once the switch resumes; meanwhile the VM refuses a new migration."""
    conversation(lab)
    before = counters(lab, "fwsrc")
    switch, manager = lab.agents["sw-dst"], lab.manager
    assert switch.proc is not None and manager is not None and manager.proc is not None
    os.killpg(switch.proc.pid, signal.SIGSTOP)
    try:
        migrate = lab.hosts.spawn(lab.ns["mg"], [*XFER, "migrate", "vm1", "--from", SOURCE, "--to",
                                                 DESTINATION, "--mode", "relay", *lab.client_args()],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(lambda: conntrack_has_vm(lab, "fwdst"))   # the firewall's import committed
        _wait_for(lambda: bool(lab.migrations()) and any(
            p["name"] == "import" and p["device"] == "sw-dst" and p["ended"] is None
            for p in lab.migrations()[0]["phases"]))
        manager.kill()
        migrate.wait(30)
        # Listening within 10 s while the frozen switch holds a request for its 30 s timeout:
        # the old manager waited for it (31 s) before listening.
        manager.start(timeout=10)
        mid = lab.migrations()[0]["id"]
        # Still frozen: the firewall is rolled back, the switch cannot be; the journal says so.
        _wait_for(lambda: not conntrack_has_vm(lab, "fwdst"))
        record = lab.migrations()[0]
        assert record["outcome"] is None and record["state"] == "rollback-pending", record
        assert "rollback-pending" in lab.xfer("migrations", "--journal", str(lab.journal)).stdout
        again = lab.xfer("migrate", "vm1", "--from", SOURCE, "--to", DESTINATION, "--mode", "relay",
                         *lab.client_args())
        assert again.returncode == 1 and "still pending" in again.stderr, again.stderr
    finally:
        os.killpg(switch.proc.pid, signal.SIGCONT)
    # Resumed: the retry reaches the switch and the journal tells the truth.
    record = lab.wait_outcome(mid, timeout=60)
    assert record["outcome"] == "rolled-back" and "manager restarted" in record["error"]
    assert bindings(lab, "swdst") == [] and not conntrack_has_vm(lab, "fwdst")
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert counters(lab, "fwsrc") == before


def test_abort_rolls_back_the_destinations_and_leaves_the_source(lab: ManagerLab) -> None:
    """``xfer migrate --abort VM`` while the destination switch hangs in its import."""
    conversation(lab)
    before = counters(lab, "fwsrc")
    switch = lab.agents["sw-dst"]
    assert switch.proc is not None
    os.killpg(switch.proc.pid, signal.SIGSTOP)
    try:
        migrate = lab.hosts.spawn(lab.ns["mg"], [*XFER, "migrate", "vm1", "--from", SOURCE, "--to",
                                                 DESTINATION, "--mode", "pull", *lab.client_args()],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(lambda: conntrack_has_vm(lab, "fwdst"))   # the firewall's pull committed
        # The switch's agent is frozen: the manager's rollback of it waits for it, so resume
        # it as soon as the abort has been sent.
        aborting = lab.hosts.spawn(lab.ns["mg"], [*XFER, "migrate", "--abort", "vm1",
                                                  *lab.client_args()],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Long enough for the CLI to start and send on a loaded machine (with 0.5 s the switch
        # resumed first and the migration committed); the frozen switch holds the migration.
        time.sleep(3)
    finally:
        os.killpg(switch.proc.pid, signal.SIGCONT)
    assert aborting.wait(30) == 0, aborting.stderr.read() if aborting.stderr else ""
    assert migrate.wait(30) == 1
    assert migrate.stderr is not None and b"aborted" in migrate.stderr.read()
    record = lab.migrations()[0]
    assert record["outcome"] == "aborted" and any(p["name"] == "rollback" for p in record["phases"])
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    assert counters(lab, "fwdst") is None
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert counters(lab, "fwsrc") == before
