"""The lab guest's cache key and cache lookup (no root, no apt, no QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xfer.lab import guest

PACKAGES = {"linux-image-6.1.0-57-cloud-amd64": "6.1.192-3", "busybox-static": "1:1.35.0-4"}


def test_key_changes_with_any_input(monkeypatch: pytest.MonkeyPatch) -> None:
    key = guest.inputs_key(PACKAGES)
    assert key == guest.inputs_key(dict(PACKAGES))
    assert key != guest.inputs_key({**PACKAGES, "busybox-static": "1:1.36.0-1"})
    monkeypatch.setattr(guest, "INIT", guest.INIT + "\n# changed\n")
    assert key != guest.inputs_key(PACKAGES)


def _entry(cache: Path, key: str, packages: dict[str, str]) -> Path:
    entry = cache / key
    entry.mkdir(parents=True)
    (entry / "vmlinuz").write_bytes(b"k")
    (entry / "initrd.img").write_bytes(b"i")
    (entry / "manifest.json").write_text(json.dumps({"packages": packages}))
    return entry


def test_cached_finds_only_a_complete_build_of_the_current_scripts(tmp_path: Path) -> None:
    assert guest.cached(tmp_path) is None
    stale = _entry(tmp_path, "0123456789abcdef", PACKAGES)   # built from other scripts
    assert guest.cached(tmp_path) is None
    good = _entry(tmp_path, guest.inputs_key(PACKAGES), PACKAGES)
    found = guest.cached(tmp_path)
    assert found is not None and found.kernel == good / "vmlinuz" and found.key == good.name
    (good / "initrd.img").unlink()                           # half-built: never used
    assert guest.cached(tmp_path) is None
    assert stale.is_dir()


def test_command_line_names_the_server() -> None:
    line = guest.kernel_cmdline("10.0.9.1", 7000)
    assert "console=ttyS0" in line and "xfer.server=10.0.9.1:7000" in line


def test_the_guest_lab_topology_routes_each_kind_to_its_device() -> None:
    import yaml

    from xfer.lab.guest_lab import topology_yaml
    from xfer.manager.plan import select
    from xfer.manager.topology import parse

    plan = select(parse(yaml.safe_load(topology_yaml())), "hv1", "hv2")
    routes = {(r.kind.value, r.source.id, tuple(d.id for d in r.destinations)) for r in plan.routes}
    assert routes == {("dhcp", "sw1", ("sw2",)), ("conntrack", "fw1", ("fw2",)),
                      ("counters", "fw1", ("fw2",))}
