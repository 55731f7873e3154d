"""The generic tc loader: bpffs mounting, pins under a given root, idempotence, one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from xfer.counters.device import PROGRAM
from xfer.ebpf import loader
from xfer.errors import BPFLoadError, NamespaceNotFound
from xfer.lab.hosts import Hosts


@pytest.fixture
def ns(hosts: Hosts) -> str:
    a, b = hosts.add("a"), hosts.add("b")
    hosts.veth(a, "eth0", b, "eth0", "10.9.1.1/24", "10.9.1.2/24")
    return b


def test_mounts_bpffs_and_pins_under_the_given_root(ns: str, tmp_path: Path) -> None:
    root = tmp_path / "bpf"
    try:
        pins = loader.attach(PROGRAM, "eth0", ns, root=root)
        assert pins == root / ns / "eth0"
        mounts = Path("/proc/self/mounts").read_text().split("\n")
        assert any(line.split()[1:3] == [str(root), "bpf"] for line in mounts if line)
        assert sorted(p.name for p in pins.iterdir()) == sorted(PROGRAM.maps)
        assert loader.attached(PROGRAM, "eth0", ns) == ("ingress", "egress")
        assert loader.detach(PROGRAM, "eth0", ns) == 2
        assert loader.attached(PROGRAM, "eth0", ns) == ()
        assert loader.unpin(PROGRAM, "eth0", ns, root) == len(PROGRAM.maps)
        assert not (root / ns).exists()
    finally:
        loader.detach(PROGRAM, "eth0", ns)
        loader.unpin(PROGRAM, "eth0", ns, root)
        subprocess.run(["umount", str(root)], check=False, capture_output=True)


def test_detach_without_clsact_is_fine(ns: str) -> None:
    assert loader.detach(PROGRAM, "eth0", ns) == 0
    assert loader.attached(PROGRAM, "eth0", ns) == ()


def test_compile_and_load_errors_are_one_line(ns: str, tmp_path: Path) -> None:
    root = tmp_path / "bpf"
    try:
        with pytest.raises(BPFLoadError) as err:
            loader.attach(PROGRAM, "eth0", ns, cflags=["-DXFER_CTR_MAX=not_a_number"], root=root)
        assert str(err.value).startswith("compiling counters.bpf.c failed: ")
        assert "not_a_number" in str(err.value) and "\n" not in str(err.value)

        broken = loader.TcProgram(PROGRAM.source, {"ingress": "no_such_function"}, 99,
                                  PROGRAM.maps)
        with pytest.raises(BPFLoadError) as err:
            loader.attach(broken, "eth0", ns, root=root)
        assert str(err.value).startswith("loading no_such_function from counters.bpf.c failed")
        assert "\n" not in str(err.value)

        with pytest.raises(BPFLoadError, match="no interface 'nope0'"):
            loader.attach(PROGRAM, "nope0", ns, root=root)
        with pytest.raises(NamespaceNotFound):
            loader.attach(PROGRAM, "eth0", "xfer-no-such-ns", root=root)
    finally:
        loader.unpin(PROGRAM, "eth0", ns, root)
        subprocess.run(["umount", str(root)], check=False, capture_output=True)
