"""A fake transfer API and agent config for agent tests without root or kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer.agent.config import AgentConfig
from xfer.bundle import Bundle, Section
from xfer.errors import ImportFailed, XferError
from xfer.model import Kind, KindReport, VmIdentity, parse_vm
from xfer.net.tls import TlsFiles
from xfer.transfer import ImportReport

VM = parse_vm("10.0.1.2,fd00:1::2", {})
OTHER_VM = parse_vm("10.0.1.3", {})


def config(tmp_path: Path, kinds: Sequence[Kind] = (Kind.CONNTRACK,), **kw: Any) -> AgentConfig:
    tls = TlsFiles(tmp_path / "pki/dev.pem", tmp_path / "pki/dev.key", tmp_path / "pki/ca.pem")
    return AgentConfig(device_id="dev", device_type="firewall", kinds=tuple(kinds), tls=tls,
                       state_dir=tmp_path / "state", **kw)


def make_bundle(vm: VmIdentity = VM, kinds: Sequence[Kind] = (Kind.CONNTRACK,), count: int = 3) -> Bundle:
    sections = {k: Section(k, "fake/1", count, b"x" * count) for k in kinds}
    return Bundle(vm=vm, source={"device": "src"}, sections=sections)


def bundle_bytes(vm: VmIdentity = VM, kinds: Sequence[Kind] = (Kind.CONNTRACK,), **kw: Any) -> bytes:
    return bundle_mod.encode(make_bundle(vm, kinds), **kw)


@dataclass
class FakeTransfer:
    """Records calls; ``refuse``/``fail`` make a kind's import raise (before/after the kernel)."""

    refuse: dict[Kind, XferError] = field(default_factory=dict)
    fail: set[Kind] = field(default_factory=set)
    imported: list[Kind] = field(default_factory=list)
    forgotten: list[tuple[VmIdentity, tuple[Kind, ...]]] = field(default_factory=list)
    exported: list[tuple[VmIdentity, tuple[Kind, ...]]] = field(default_factory=list)
    on_import: Any = None
    on_export: Any = None
    options: list[Any] = field(default_factory=list)

    def export_bundle(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
                      device: str | None = None, options: Any = None) -> Bundle:
        if self.on_export:
            self.on_export()
        self.exported.append((vm, tuple(kinds)))
        return make_bundle(vm, kinds)

    def import_bundle(self, bundle: Bundle, namespace: str | None = None, *,
                      vm: VmIdentity | None = None, kinds: Sequence[Kind] | None = None,
                      options: Any = None) -> ImportReport:
        report = ImportReport()
        self.options.append(options)
        for kind in kinds or bundle.sections:
            if self.on_import:
                self.on_import(kind)
            if kind in self.refuse:
                raise self.refuse[kind]
            if kind in self.fail:
                report.kinds[kind] = KindReport(kind, failed=1, rolled_back=True)
                report.errors[kind] = str(ImportFailed("1 entry failed; rolled back"))
                continue
            self.imported.append(kind)
            report.kinds[kind] = KindReport(kind, created=bundle.sections[kind].count)
        return report

    def forget(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
               options: Any = None) -> dict[Kind, KindReport]:
        self.forgotten.append((vm, tuple(kinds)))
        return {k: KindReport(k, deleted=1) for k in kinds}


@dataclass
class FakePeers:
    """Other agents, answering from a FakeTransfer-backed bundle."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes:
        self.fetched.append(url)
        return bundle_bytes(vm, kinds)

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind]) -> dict[str, Any]:
        self.sent.append((url, data))
        return {"created": 3, "updated": 0, "skipped": 0, "failed": 0,
                "kinds": {k.value: {"created": 3} for k in kinds}}
