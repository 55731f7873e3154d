"""A real QEMU migration's pause window drives the real manager, which moves the lab VM's state.

``xfer qemu-migrate`` (the hook) runs as an operator would, inside the manager's
management namespace; it talks QMP to two real QEMU processes (unix sockets) and
sends the migration message over mutual TLS to ``xfer manager serve``, which moves
conntrack, the DHCP binding and the counters from the source path's devices to
the destination path's while the source guest is paused. Once the destination
guest runs, the lab VM's link moves and the server speaks first (tcp_loose=0).
"""

from __future__ import annotations

import json
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
from xfer.lab.manager_lab import DESTINATION, SOURCE, ManagerLab
from xfer.lab.qemu import QemuPair, qemu_binary
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import conversation_continues

pytestmark = [needs_all_kinds, pytest.mark.skipif(
    qemu_binary() is None, reason="qemu-system-x86_64 not installed (Debian qemu-system-x86)")]


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch)


@pytest.mark.parametrize("mode", ["push", "store"])
def test_hook_message_to_the_real_manager_and_the_connection_survives(lab: ManagerLab, mode: str) -> None:
    vm, srv = conversation(lab)
    before = counters(lab, "fwsrc")
    tls = lab.client_args()[2:]   # --ca --cert --key
    with QemuPair() as pair:
        out = lab.xfer("qemu-migrate", "--src-qmp", pair.src.qmp, "--dst-qmp", pair.dst.qmp,
                       "--uri", pair.uri(), "--vm", "vm1", "--manager", lab.url, "--from", SOURCE,
                       "--to", DESTINATION, "--mode", mode, "--deadline-ms", "5000",
                       "--cacert", tls[1], "--cert", tls[3], "--key", tls[5], "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["outcome"] == "moved" and report["status"] == "completed", report
    # store mode: the hook sent "out" then "in" inside the window.
    assert [m["state"] for m in report["manager"]] == (["stored", "committed"] if mode == "store"
                                                        else ["committed"])
    assert conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == [VM_IP]
    assert counters(lab, "fwdst") == before
    lab.move_vm()   # the guest runs at the destination now
    assert conversation_continues(vm, srv, "after-migration"), "the connection died"
    assert lab.wait_outcome(report["manager"][-1]["migration"])["outcome"] == "cleaned"
