"""The hook with REAL QEMU (TCG, no disk) and a real HTTP stand-in for the manager.

Each test starts a source guest and a `-incoming defer` destination, migrates over
127.0.0.1, and watches both from their second QMP monitor ("witness"). Skipped,
with the reason, only when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from xfer.hypervisor import hook, window
from xfer.hypervisor.qmp import QmpClient
from xfer.lab.qemu import QemuPair, qemu_binary
from xfer.lab.stub_manager import StubManager

pytestmark = pytest.mark.skipif(qemu_binary() is None,
                                reason="qemu-system-x86_64 not installed (Debian qemu-system-x86)")


@pytest.fixture
def pair() -> Iterator[QemuPair]:
    with QemuPair() as p:
        yield p


def options(url: str, **kw: Any) -> hook.HookOptions:
    return hook.HookOptions(vm="vm1", manager=url, source="hv1", destination="hv2",
                            wait_s=20, finish_s=20, **kw)


async def status(qmp: QmpClient) -> dict[str, Any]:
    return dict(await qmp.execute("query-status"))


async def until_armed(qmp: QmpClient) -> None:
    async with asyncio.timeout(10):
        while not (await window.capabilities(qmp)).get(window.PAUSE):
            await asyncio.sleep(0.01)


async def start_migration(src: QmpClient, dst: QmpClient, uri: str) -> None:
    """What an orchestrator does once the hook armed the source."""
    await window.set_capabilities(dst, {window.EVENTS: True})
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})


def witnesses_probe(src: QmpClient, dst: QmpClient) -> Any:
    async def probe(message: dict[str, Any]) -> dict[str, Any]:
        return {"src": await status(src), "dst": await status(dst),
                "src_migration": await window.migration_status(src)}
    return probe


def test_hook_moves_state_inside_the_window(pair: QemuPair) -> None:
    async def scenario() -> None:
        async with QmpClient(pair.src.witness) as src, QmpClient(pair.dst.witness) as dst, \
                StubManager(delay_s=0.2, probe=witnesses_probe(src, dst)) as mgr:
            await window.set_capabilities(dst, {window.EVENTS: True})
            task = asyncio.create_task(hook.run_hook(pair.src.qmp, options(mgr.url)))
            await until_armed(src)
            await start_migration(src, dst, pair.uri())
            report = await task
            resume = await dst.wait_event(lambda e: e.name == "RESUME", 10)
            stop = src.last_event("STOP")

            assert report.ok, report.to_dict()
            assert report.status == "completed"
            [rec] = mgr.received
            assert rec.message == {"vm": "vm1", "indication": "not-running", "direction": "out",
                                   "source": "hv1", "destination": "hv2"}
            # While the manager worked: source stopped in the window, destination not running.
            assert rec.probe["src"]["running"] is False
            assert rec.probe["src"]["status"] == "finish-migrate"
            assert rec.probe["src_migration"] == "pre-switchover"
            assert rec.probe["dst"]["running"] is False
            assert rec.probe["dst"]["status"] == "inmigrate"
            # And by QEMU's own clock: after the source stopped, answered before the destination ran.
            assert stop is not None and stop.timestamp < rec.arrived
            assert rec.answered is not None and rec.answered < resume.timestamp
            # The downtime QEMU reports contains the time the hook held the window.
            assert report.downtime_ms is not None and report.downtime_ms >= 200
            assert (await status(dst))["running"] is True
            # Capability cleared afterwards.
            assert (await window.capabilities(src))[window.PAUSE] is False

    asyncio.run(scenario())
