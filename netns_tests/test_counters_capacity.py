"""The counters table's capacity is configurable, its cost known, and a full table refuses
clearly (issue 12.6).

A 50,000-VM bulk move (dual-stack: 100,000 keys) failed with E2BIG against the
fixed 65,536 keys. Here the destination is attached with ``--max-keys`` through
the CLI, takes the 100,000 keys, and refuses the next bundle that would not fit
with one line naming the limit and the option.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from netns_tests.counters_lab import DEV
from xfer.counters import device as counters_device
from xfer.counters import model as counters
from xfer.counters import transfer as counters_transfer
from xfer.errors import ImportFailed, UsageError
from xfer.lab.hosts import Hosts

XFER = [sys.executable, "-m", "xfer.cli"]


def _keys(first: int, vms: int) -> counters.Columns:
    """Carried counts for ``vms`` dual-stack VMs: two keys each."""
    table: counters.Table = {}
    for i in range(first, first + vms):
        mac = "02:bb:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
        for ip in (f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}", f"fd00:88::{i:x}"):
            table[counters.make_key(mac, ip)] = (i + 1, 98 * (i + 1), i, 98 * i, 1, 0)
    return counters.Columns(*counters.to_raw(table))


def _xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XFER, *args], capture_output=True, text=True, timeout=300, check=False)


def test_a_50k_vm_bulk_move_fits_when_configured_and_a_full_table_refuses_clearly(
        hosts: Hosts) -> None:
    fw = hosts.add("fw")
    hosts.check(fw, ["ip", "link", "add", DEV, "type", "veth", "peer", "name", "vmpeer"])
    hosts.link_up(fw, DEV)
    try:
        r = _xfer("counters", "attach", "--dev", DEV, "--netns", fw, "--max-keys", "120000")
        assert r.returncode == 0, r.stderr
        assert "room for 120000 keys" in r.stdout and "MiB" in r.stdout   # the cost is said
        with counters_device.open_maps(fw, DEV) as maps:
            assert maps.live.map.max_entries == 120_000
            assert maps.carried.capacity >= 120_000
        assert counters_device.capacity(fw, DEV).max_keys == 120_000

        bulk = _keys(0, 50_000)                                # 100,000 keys in one import
        report = counters_transfer.import_columns(bulk, uuid.uuid4().hex, fw)
        assert report.created == 100_000
        assert len(counters_transfer.export_columns(None, fw)) == 100_000

        with pytest.raises(ImportFailed) as err:               # 22,000 more do not fit
            counters_transfer.import_columns(_keys(50_000, 11_000), uuid.uuid4().hex, fw)
        message = str(err.value)
        assert "\n" not in message
        assert "120000" in message and "--max-keys" in message and "120000 keys" in message
        assert len(counters_transfer.export_columns(None, fw)) == 100_000   # nothing changed

        # the size of pinned maps cannot change under them: said, not silently ignored
        with pytest.raises(UsageError, match=r"room for 120000 keys.*--unpin"):
            counters_device.attach(DEV, fw, max_keys=200_000)
        counters_device.attach(DEV, fw)                        # without the option: as pinned
        assert counters_device.capacity(fw, DEV).max_keys == 120_000
        r = _xfer("counters", "attach", "--dev", DEV, "--netns", fw, "--max-keys", "10")
        assert r.returncode == 2 and "--max-keys" in r.stderr
    finally:
        counters_device.detach(DEV, fw, unpin=True)
