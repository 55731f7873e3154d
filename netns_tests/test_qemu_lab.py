"""A real QEMU migration's pause window moves the lab VM's conntrack state; its TCP
connection survives — and, as the control, dies when the window moves nothing.

QEMU (TCG, no disk) supplies the migration and its window; the lab's VM namespace
is that VM's network side. The migration message goes from the hook to a real HTTP
stand-in manager whose handler does what the manager (issue 6) will do: export the
VM's conntrack entries from the source firewall and import them into the
destination firewall. After the destination guest resumes, the VM's link moves to
the destination firewall and the *server* speaks first (tcp_loose=0).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from netns_tests.lab_helpers import conntrack_list, strict_destination, tcp_conversation
from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.hypervisor import hook, migrate, window
from xfer.hypervisor.qmp import QmpClient
from xfer.lab.qemu import QemuPair, qemu_binary
from xfer.lab.stub_manager import StubManager
from xfer.lab.topology import SERVICE_IP, VM_IP, VM_IP6, Lab
from xfer.lab.traffic import conversation_continues
from xfer.model import Kind, parse_vm

pytestmark = pytest.mark.skipif(qemu_binary() is None,
                                reason="qemu-system-x86_64 not installed (Debian qemu-system-x86)")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(f"q{os.getpid() % 10000}") as lab:
        lab.up()
        yield lab


def _move_state(lab: Lab) -> dict[str, Any]:
    """The manager's job, done by the stand-in inside the window."""
    ident = parse_vm(f"{VM_IP},{VM_IP6}", {})
    b = transfer.export_bundle(ident, [Kind.CONNTRACK], lab.fwsrc, device=lab.fwsrc)
    report = transfer.import_bundle(bundle_mod.decode(bundle_mod.encode(b)), lab.fwdst)
    return report.to_dict()


@pytest.mark.parametrize("moves_state", [True, False], ids=["state-moved", "control-nothing-moved"])
def test_connection_survives_because_the_window_moved_its_state(lab: Lab, moves_state: bool) -> None:
    strict_destination(lab, loose=False)
    vm, srv = tcp_conversation(lab, SERVICE_IP)

    async def scenario(pair: QemuPair) -> tuple[Any, Any]:
        async with QmpClient(pair.src.witness) as src:
            async def work(message: dict[str, Any]) -> dict[str, Any]:
                stopped = await window.migration_status(src)
                moved = await asyncio.to_thread(_move_state, lab) if moves_state else None
                # conntrack(8) as the witness: the destination holds the entry before any resume.
                table = await asyncio.to_thread(conntrack_list, lab, lab.fwdst)
                return {"src_migration": stopped, "moved": moved, "dst_table": table}

            async with StubManager(work=work) as mgr:
                # the window alone (no "migrating"): this test is about what the pause holds
                opts = hook.HookOptions(vm="vm1", manager=mgr.url, source="hv1", destination="hv2",
                                        deadline_s=5.0, wait_s=20, finish_s=20, precopy=False)
                report = await migrate.run_migration(pair.src.qmp, pair.dst.qmp, pair.uri(), opts)
                return report, mgr.received[0].work

    with QemuPair() as pair:
        report, seen = asyncio.run(scenario(pair))
    assert report.ok, report.to_dict()
    assert seen["src_migration"] == "pre-switchover"
    lab.move_vm()  # the guest runs at the destination now: its traffic comes through fwdst
    survived = conversation_continues(vm, srv, "after-migration")
    if moves_state:
        assert seen["moved"]["created"] >= 1 and seen["moved"]["failed"] == 0
        assert VM_IP in seen["dst_table"]
        assert survived, "the connection died although the window moved its state"
    else:
        assert VM_IP not in seen["dst_table"]
        assert not survived, "the connection survived without its state: the test does not discriminate"
