"""Bindings survive a program reload, a process restart and the loss of the pins."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import NET, SwitchLab, switches
from xfer.dhcp import datapath, device
from xfer.lab.hosts import Hosts, stop_process


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm",))) as (built,):
        yield built


def db_ips(path: Path) -> list[str]:
    try:
        return [r["ip"] for r in json.loads(path.read_text())["bindings"]]
    except (FileNotFoundError, ValueError):
        return []


def test_reload_keeps_bindings(lab: SwitchLab) -> None:
    lab.attach()
    lab.crafted_lease("vm", f"{NET}.70", 300)
    report = device.attach(lab.sw, ["uplink"], ["p-vm"], "enforce")   # reload the program
    assert (report.kept, report.restored) == (1, 0)
    assert lab.ping("vm")


def test_serve_persists_and_a_fresh_start_restores(lab: SwitchLab, tmp_path: Path) -> None:
    lab.attach()
    db = tmp_path / "db" / f"{lab.sw}.json"
    serve = lab.hosts.spawn(lab.sw, [sys.executable, "-m", "xfer.cli", "dhcp", "serve",
                                     "--netns", lab.sw, "--interval", "0.1"],
                            stderr=subprocess.PIPE)
    lab.procs.append(serve)
    ip = f"{NET}.71"
    lab.crafted_lease("vm", ip, 300)       # learned by the datapath alone
    deadline = time.monotonic() + 3
    while ip not in db_ips(db) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db_ips(db) == [ip]
    stop_process(serve)                    # SIGTERM: clean stop
    assert serve.returncode == 0, serve.stderr.read() if serve.stderr else ""

    # as after a reboot: no filters, no pinned maps; the file is all that is left
    datapath.detach(lab.sw, purge=True)
    report = device.attach(lab.sw, ["uplink"], ["p-vm"], "enforce")
    assert report.restored == 1
    rows = lab.bindings()
    assert [(r["ip"], r["port"]) for r in rows] == [(ip, "p-vm")]
    assert 280 < float(rows[0]["lease_remaining"]) <= 300    # type: ignore[arg-type]
    assert lab.ping("vm")


def test_static_bindings_from_the_cli(lab: SwitchLab) -> None:
    lab.attach()
    lab.set_ip("vm", f"{NET}.72")
    assert not lab.ping("vm")
    mac = lab.mac(lab.vms["vm"])
    lab.xfer("dhcp", "add", "--mac", mac, "--ip", f"{NET}.72", "--port", "p-vm",
             "--netns", lab.sw)
    assert lab.ping("vm")
    rows = lab.bindings()
    assert rows[0]["lease_remaining"] is None and rows[0]["source"] == "static"
    lab.xfer("dhcp", "del", "--mac", mac, "--ip", f"{NET}.72", "--netns", lab.sw)
    assert not lab.ping("vm")
    assert lab.xfer("dhcp", "del", "--mac", mac, "--ip", f"{NET}.72", "--netns", lab.sw,
                    check=False).returncode == 1
