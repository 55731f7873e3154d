"""The device-driven variant in the manager's lab: agents and manager as processes, all in the
multicast group; migration messages are datagrams sent from a device (``xfer notify --udp GROUP``).

On "out" the source firewall's agent deposits the VM's state in the manager's store itself; on
"in" the destination switch's and firewall's agents collect and import it themselves and report
to the manager, which commits and only then cleans the source. Witnesses as in
test_manager.py: the server speaks first with tcp_loose=0 at the destination, the switch's source
guard, the counters, conntrack(8); and the agents' logs say who did what.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns_tests.manager_helpers import (
    assert_cleaned_after_commit,
    bindings,
    conntrack_has_vm,
    conversation,
    counters,
    needs_all_kinds,
    running_lab,
)
from xfer.lab.manager_lab import ManagerLab
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import conversation_continues

pytestmark = needs_all_kinds
DEVICE_TIMEOUT_S = 3


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch, device_timeout_s=DEVICE_TIMEOUT_S)


@pytest.fixture
def short_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch, store_ttl_s=1)


def _answer(out: object) -> dict[str, object]:
    assert getattr(out, "returncode", 1) == 0, getattr(out, "stderr", "")
    answer: dict[str, object] = json.loads(getattr(out, "stdout", ""))
    return answer


def _ops(lab: ManagerLab, agent: str, op: str) -> int:
    """How many times an agent's log records ``op`` (its own device-driven work or a request)."""
    return lab.agents[agent].log_text().count(f'"op":"{op}"')


def test_datagrams_to_the_group_make_the_devices_move_the_state(lab: ManagerLab) -> None:
    vm, srv = conversation(lab)
    before = counters(lab, "fwsrc")
    assert before and before["tx_packets"] > 0

    # "out", sent twice at once (multicast may repeat a datagram): one deposit.
    stored = _answer(lab.notify("out", "--id", "dd-out", "--copies", "2"))
    assert stored["state"] == "stored" and stored["driven_by"] == "devices", stored
    mid = stored["migration"]
    assert _ops(lab, "fw-src", "deposit") == 1 and _ops(lab, "fw-src", "export") == 0, \
        "the source agent did not deposit on its own"
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    assert conntrack_has_vm(lab, "fwsrc"), "the source lost its state before the destinations committed"
    again = _answer(lab.notify("out", "--id", "dd-out"))
    assert again["duplicate"] and again["migration"] == mid and _ops(lab, "fw-src", "deposit") == 1

    # "in", from the destination firewall's management address.
    report = _answer(lab.notify("in", "--id", "dd-in", sender="fwdst"))
    assert report["state"] == "committed" and report["migration"] == mid, report
    assert conntrack_has_vm(lab, "fwdst")
    assert bindings(lab, "swdst") == [VM_IP]
    assert counters(lab, "fwdst") == before, "counters did not arrive as the source held them"
    for agent in ("fw-dst", "sw-dst"):
        assert _ops(lab, agent, "collect") == 1 and _ops(lab, agent, "import") == 0, agent
    again = _answer(lab.notify("in", "--id", "dd-in", "--copies", "3", sender="swdst"))
    assert again["duplicate"] and again["migration"] == mid
    assert _ops(lab, "fw-dst", "collect") == 1 and counters(lab, "fwdst") == before

    lab.move_vm()
    assert conversation_continues(vm, srv, "after-move"), "the connection died"
    after = counters(lab, "fwdst")
    assert after and after["tx_packets"] > before["tx_packets"], "counters did not continue"

    record = lab.wait_outcome(int(str(mid)))
    assert record["outcome"] == "cleaned", record
    assert_cleaned_after_commit(record)
    assert sorted((p["name"], p["device"]) for p in record["phases"]) == [
        ("cleanup", "fw-src"), ("collect", "fw-dst"), ("collect", "sw-dst"), ("deposit", "fw-src")]
    assert not conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == []
    assert counters(lab, "fwsrc") is None
    assert len(lab.migrations()) == 1
    for proc in (lab.manager, *lab.agents.values()):
        assert proc is not None and "Traceback" not in proc.log_text()


def test_a_source_that_does_not_know_the_destination(lab: ManagerLab) -> None:
    """libvirt's case: "out" names no destination; the destination server's "in" names itself."""
    vm, srv = conversation(lab)
    stored = _answer(lab.notify("out", destination=""))
    assert stored["state"] == "stored" and stored["destination"] == ""
    report = _answer(lab.notify("in", sender="fwdst"))
    assert report["state"] == "committed" and report["destination"] == "hv-dst"
    lab.move_vm()
    assert conversation_continues(vm, srv, "after-move"), "the connection died"
    assert bindings(lab, "swdst") == [VM_IP]


def test_a_destination_that_does_not_commit_rolls_back_the_other(lab: ManagerLab) -> None:
    conversation(lab)
    before = counters(lab, "fwsrc")
    _answer(lab.notify("out"))
    switch = lab.agents["sw-dst"]
    assert switch.proc is not None
    # The switch's agent freezes past the manager's wait, then resumes: the manager's rollback
    # (a forget at each destination) waits for it.
    os.killpg(switch.proc.pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        try:
            sent = pool.submit(lab.notify, "in", sender="fwdst")
            time.sleep(DEVICE_TIMEOUT_S + 1.5)
        finally:
            os.killpg(switch.proc.pid, signal.SIGCONT)
        out = sent.result()
    assert out.returncode == 1 and f"sw-dst did not import fw-src's bundle within {DEVICE_TIMEOUT_S} s" \
        in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # The firewall's import was rolled back; the switch, resumed, hears the stale datagram and
    # learns from the manager that its part is over: it imports nothing.
    time.sleep(1)
    assert not conntrack_has_vm(lab, "fwdst") and counters(lab, "fwdst") is None
    assert bindings(lab, "swdst") == [] and _ops(lab, "sw-dst", "collect") == 0
    # The source is as it was.
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert counters(lab, "fwsrc") == before
    assert lab.migrations()[0]["outcome"] == "rolled-back"


def test_an_expired_stored_bundle_is_a_clear_error(short_store: ManagerLab) -> None:
    lab = short_store
    conversation(lab)
    _answer(lab.notify("out"))
    time.sleep(1.5)
    out = lab.notify("in", sender="fwdst")
    assert out.returncode == 1, out.stdout
    assert "the stored bundles of VM vm1 expired" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    assert conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == [VM_IP]
    assert lab.migrations()[0]["outcome"] == "failed"
