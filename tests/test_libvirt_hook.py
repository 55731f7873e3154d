"""contrib/libvirt-qemu-hook, run as libvirt runs it (argv + domain XML on stdin), no libvirt.

The observer it starts is exercised against a real QEMU whose second monitor stands
for the xfer monitor, with a libvirt-like owner of the window (arm, then continue at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xfer.hypervisor import window
from xfer.hypervisor.qmp import QmpClient
from xfer.lab.qemu import QemuPair, qemu_binary
from xfer.lab.stub_manager import StubManager

SCRIPT = Path(__file__).resolve().parents[1] / "contrib" / "libvirt-qemu-hook"
DOMAIN = "<domain type='kvm'><name>vm1</name><memory>65536</memory></domain>"


def hook(run_dir: Path, *args: str, xml: str = DOMAIN, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XFER_")}
    environ.update(XFER_HOOK_CONF=str(run_dir / "none.conf"), XFER_RUN_DIR=str(run_dir),
                   XFER_BIN=str(Path(sys.executable).parent / "xfer"), **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=xml, capture_output=True,
                          text=True, env=environ, timeout=30, check=False)


def test_without_a_manager_it_does_nothing(tmp_path: Path) -> None:
    r = hook(tmp_path, "vm1", "migrate", "begin", "-", XFER_INJECT_MONITOR="1")
    assert (r.returncode, r.stdout) == (0, "")


def test_migrate_begin_passes_the_xml_unchanged_by_default(tmp_path: Path) -> None:
    r = hook(tmp_path, "vm1", "migrate", "begin", "-", XFER_MANAGER_URL="http://127.0.0.1:1/m")
    assert (r.returncode, r.stdout) == (0, "")  # empty output = XML unchanged, for libvirt


def test_migrate_begin_adds_the_xfer_monitor_once(tmp_path: Path) -> None:
    env = {"XFER_MANAGER_URL": "http://127.0.0.1:1/m", "XFER_INJECT_MONITOR": "1"}
    first = hook(tmp_path, "vm1", "migrate", "begin", "-", **env)
    assert first.returncode == 0, first.stderr
    assert "http://libvirt.org/schemas/domain/qemu/1.0" in first.stdout
    assert f"unix:{tmp_path}/vm1.qmp,server=on,wait=off" in first.stdout
    again = hook(tmp_path, "vm1", "migrate", "begin", "-", xml=first.stdout, **env)
    assert again.stdout == first.stdout and again.stdout.count("-qmp") == 1
    bad = hook(tmp_path, "vm1", "migrate", "begin", "-", xml="<domain>", **env)
    assert bad.returncode == 1 and "cannot add the xfer monitor" in bad.stderr


def test_started_without_the_monitor_says_so_and_lets_the_domain_start(tmp_path: Path) -> None:
    r = hook(tmp_path, "vm1", "started", "begin", "-", XFER_MANAGER_URL="http://127.0.0.1:1/m")
    assert r.returncode == 0 and "no xfer QMP monitor" in r.stderr


@pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed")
def test_observer_started_by_the_hook_sends_the_message_when_the_guest_stops(tmp_path: Path) -> None:
    async def scenario(pair: QemuPair) -> None:
        (tmp_path / "vm1.qmp").symlink_to(pair.src.witness)
        async with StubManager() as mgr:
            env = {"XFER_MANAGER_URL": mgr.url, "XFER_SERVER": "hv1", "XFER_MODE": "relay"}
            r = await asyncio.to_thread(hook, tmp_path, "vm1", "started", "begin", "-", **env)
            assert r.returncode == 0, r.stderr
            pid = int((tmp_path / "vm1.observer.pid").read_text())
            async with QmpClient(pair.src.qmp) as src, QmpClient(pair.dst.qmp) as dst:
                await _until_watching(tmp_path / "vm1.observer.log")
                await window.set_capabilities(dst, {window.EVENTS: True})
                armed = await window.arm(src)
                uri = pair.uri()
                await dst.execute("migrate-incoming", {"uri": uri})
                await src.execute("migrate", {"uri": uri})
                await window.wait_for_window(src, armed.since, 20)
                await window.continue_migration(src)  # libvirt does not wait for anyone
                await window.wait_finished(src, armed.since, 20)
                async with asyncio.timeout(20):
                    while _alive(pid):
                        await asyncio.sleep(0.05)
            [rec] = mgr.received
            assert rec.message == {"vm": "vm1", "indication": "not-running", "direction": "out",
                                   "source": "hv1", "destination": "", "mode": "relay"}
            report = _report(tmp_path / "vm1.observer.log")
            assert report["outcome"] == "observed" and report["status"] == "completed"
            r = await asyncio.to_thread(hook, tmp_path, "vm1", "release", "end", "-", **env)
            assert r.returncode == 0 and not (tmp_path / "vm1.observer.pid").exists()

    with QemuPair() as pair:
        asyncio.run(scenario(pair))


@pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed")
def test_destination_observer_sends_in_once_the_vm_arrived(tmp_path: Path) -> None:
    """migrate begin here, then started begin: the observer on the destination's monitor
    sends "in" naming this server when the VM arrives, then watches on as usual."""
    async def scenario(pair: QemuPair) -> None:
        (tmp_path / "vm1.qmp").symlink_to(pair.dst.witness)
        async with StubManager() as mgr:
            env = {"XFER_MANAGER_URL": mgr.url, "XFER_SERVER": "hv2", "XFER_MODE": "store"}
            r = await asyncio.to_thread(hook, tmp_path, "vm1", "migrate", "begin", "-", **env)
            assert r.returncode == 0 and (tmp_path / "vm1.incoming").exists()
            r = await asyncio.to_thread(hook, tmp_path, "vm1", "started", "begin", "-", **env)
            assert r.returncode == 0, r.stderr
            assert not (tmp_path / "vm1.incoming").exists()
            pid = int((tmp_path / "vm1.observer.pid").read_text())
            async with QmpClient(pair.src.qmp) as src, QmpClient(pair.dst.qmp) as dst:
                await _until_watching(tmp_path / "vm1.observer.log")
                assert mgr.received == []  # nothing before the VM is here
                await window.set_capabilities(dst, {window.EVENTS: True})
                since = len(src.events)
                uri = pair.uri()
                await dst.execute("migrate-incoming", {"uri": uri})
                await src.execute("migrate", {"uri": uri})
                await window.wait_finished(src, since, 20)
                async with asyncio.timeout(20):
                    while not mgr.received:
                        await asyncio.sleep(0.05)
            [rec] = mgr.received
            assert rec.message == {"vm": "vm1", "indication": "starting", "direction": "in",
                                   "source": "", "destination": "hv2", "mode": "store"}
            log = (tmp_path / "vm1.observer.log").read_text()
            assert '"outcome": "in-sent"' in log
            assert _alive(pid)  # and it watches on, for the VM's next migration away
            r = await asyncio.to_thread(hook, tmp_path, "vm1", "release", "end", "-", **env)
            assert r.returncode == 0 and not (tmp_path / "vm1.observer.pid").exists()

    with QemuPair() as pair:
        asyncio.run(scenario(pair))


@pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed")
def test_release_stops_a_waiting_observer(tmp_path: Path) -> None:
    with QemuPair() as pair:
        (tmp_path / "vm1.qmp").symlink_to(pair.src.witness)
        env = {"XFER_MANAGER_URL": "http://127.0.0.1:1/m"}
        assert hook(tmp_path, "vm1", "started", "begin", "-", **env).returncode == 0
        pid = int((tmp_path / "vm1.observer.pid").read_text())
        assert hook(tmp_path, "vm1", "started", "begin", "-", **env).returncode == 0  # no second one
        assert int((tmp_path / "vm1.observer.pid").read_text()) == pid
        assert hook(tmp_path, "vm1", "release", "end", "-", **env).returncode == 0
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    """The observer is the hook script's child, not ours: read its state (zombie = gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


async def _until_watching(log: Path) -> None:
    """The observer says on stderr (its log) once it holds the monitor."""
    async with asyncio.timeout(20):
        while not log.exists() or "watching" not in log.read_text():
            await asyncio.sleep(0.02)


def _report(log: Path) -> dict:
    text = log.read_text()
    return json.loads(text[text.index("{"):])
