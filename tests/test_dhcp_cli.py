"""`xfer dhcp` parses and refuses bad input before touching any device (no root needed)."""

from __future__ import annotations

import subprocess
import sys


def xfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_commands_are_listed() -> None:
    out = xfer("dhcp", "--help").stdout
    for command in ("attach", "detach", "bindings", "add", "del", "serve", "counters"):
        assert command in out


def test_bad_mode_is_a_usage_error() -> None:
    proc = xfer("dhcp", "attach", "--untrusted", "vm0", "--mode", "drop-everything",
                "--netns", "no-such-ns")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("xfer: mode 'drop-everything'")


def test_bad_binding_is_a_usage_error() -> None:
    proc = xfer("dhcp", "add", "--mac", "not-a-mac", "--ip", "10.0.0.2")
    assert proc.returncode == 2 and "not a MAC address" in proc.stderr
    proc = xfer("dhcp", "add", "--mac", "02:00:00:00:00:02", "--ip", "10.0.0.300")
    assert proc.returncode == 2 and "not an IPv4 address" in proc.stderr


def test_the_program_is_printable() -> None:
    out = xfer("dhcp", "attach", "--untrusted", "x", "--ebpf").stdout
    assert "dhcpsnoop_ingress" in out and "BPF_TABLE_PINNED" in out
