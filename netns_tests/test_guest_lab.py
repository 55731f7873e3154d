"""End to end with real guests: `xfer lab demo --guest --json`, as an operator runs it.

Two Debian guests boot under QEMU in hv1, lease through sw1's snooper and answer
the server through fw1; vm1 live-migrates to hv2 with `xfer qemu-hook` owning the
pause window (the manager moves conntrack, the DHCP binding and the counters), vm2
migrates without xfer. The command's own checks are the contract; this test reads
them and the figures, then checks that nothing of the lab is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xfer import netns
from xfer.lab import guest
from xfer.lab.guest_lab import GuestLab
from xfer.lab.qemu import qemu_binary

pytestmark = [
    pytest.mark.skipif(qemu_binary() is None,
                       reason="qemu-system-x86_64 not installed (Debian qemu-system-x86)"),
    pytest.mark.skipif(guest.cached() is None,
                       reason="the lab guest is not built: run scripts/setup (apt-get download)"),
]
KEYS = ("guest_booted", "tcp_continued", "dhcp_binding_moved", "counters_carried", "control_cut")


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    name = f"g{os.getpid() % 10000}"
    try:
        yield name
    finally:
        # Whatever the demo left (it was killed, it failed half-way): QEMU, dnsmasq, agents,
        # the manager run inside the lab's namespaces and go with them.
        GuestLab(name, tmp_path).down()


def test_the_guest_keeps_its_connection_binding_and_counters_only_with_xfer(
        prefix: str, tmp_path: Path) -> None:
    env = {**os.environ, "XFER_DHCP_STATE_DIR": str(tmp_path / "dhcp")}
    out = subprocess.run([sys.executable, "-m", "xfer.cli", "lab", "demo", "--guest", "--json",
                          "--prefix", prefix], capture_output=True, text=True, timeout=240,
                         env=env, check=False)
    assert out.stdout, out.stderr
    result = json.loads(out.stdout)
    assert {k: result[k] for k in KEYS} == dict.fromkeys(KEYS, True), (result, out.stderr)
    assert out.returncode == 0, out.stderr
    d = result["details"]
    # The figures are QEMU's own, for both runs.
    for key in ("downtime_ms", "guest_gap_ms"):
        assert result[key]["with_xfer"] > 0 and result[key]["without_xfer"] > 0, result[key]
    assert d["hook"]["outcome"] == "moved" and d["hook"]["status"] == "completed"
    # The window held the transfer: the guest ran nowhere while the state moved.
    assert result["guest_gap_ms"]["with_xfer"] >= result["pause_cost_ms"]["transfer"]
    cost = result["pause_cost_ms"]
    if cost["precopy"] is None:     # the window came before QEMU reported the migration active
        assert set(cost["by_kind"]) == {"dhcp", "conntrack+counters"}, cost
    else:                           # pre-copied: conntrack's last delta went beside these phases
        assert set(cost["by_kind"]) == {"dhcp", "counters"} and cost["precopy"]["staged"] >= 1, cost
    # Independent witnesses the command collected: sw2 holds the moved binding, dropped only
    # the control guest; fw2 counted vm1's connection although its SYN never crossed fw2.
    assert [(b["mac"], b["port"]) for b in d["sw2_bindings"]] == [("52:54:00:00:01:01", "tap-vm1")]
    assert d["sw2_drops"]["tap-vm2"] > 0 and d["sw2_drops"]["tap-vm1"] == 0
    assert d["fw2_counters"]["vm1"]["tcp_initiated"] == 1 and d["fw2_counters"]["vm2"] is None
    assert d["control"] == {"answered": False, "sw2_dropped": d["sw2_drops"]["tap-vm2"],
                            "fw2_conntrack": False}
    # Nothing left: namespaces (with their processes), QEMU (its sockets live in the run's
    # directory, named after the prefix), BPF pins.
    assert not [n for n in ("hv1", "hv2", "fw1", "fw2", "srv", "mg") if netns.exists(f"{prefix}-{n}")]
    left = subprocess.run(["pgrep", "-af", f"xfer-guest-lab-{prefix}-"], capture_output=True,
                          text=True, check=False).stdout
    assert not left.strip(), f"processes left behind: {left}"
    assert not list(Path("/run/xfer/bpf").glob(f"{prefix}-*")), "BPF pins left behind"
