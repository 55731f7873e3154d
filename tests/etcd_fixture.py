"""A real etcd on loopback per test (random ports, own data dir, stopped in the finalizer)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from xfer.lab.etcd import EtcdProcess

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server not installed (scripts/setup installs it)")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path / "etcd")
    try:
        yield proc.start()
    finally:
        proc.stop()
