"""What an agent does, without HTTP: validate, journal, run the transfer API, push, pull.

Every device operation goes through ``xfer.transfer`` (injected, so unit tests
give it fakes); kernel work runs in a worker thread (``asyncio.to_thread``) so
the event loop keeps answering. Rules (docs/architecture.md, reliability rules):

- only kinds this device holds are exported, imported or forgotten;
- an import names its VM, and the bundle must be that VM's (the kind modules
  then refuse any entry that is not the VM's) and within the size limit;
- a refused request changes nothing: validation comes before the kernel, and if
  a later kind of a multi-kind import is refused, the kinds already committed by
  that request are forgotten again;
- an import interrupted by the agent's death is rolled back at restart (journal);
- the source never deletes on its own initiative: push and pull only copy;
- once a migration's state was forgotten here (``protocol.MIGRATION`` names the
  migration of the work under way), a later import of that migration is refused:
  a rollback reaches imports still on their way. One under way when the forget
  comes finishes first (the kernel lock), and the forget then undoes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from xfer import bundle as bundle_mod
from xfer.agent.config import AgentConfig
from xfer.agent.exports import SharedExports
from xfer.agent.journal import Journal
from xfer.agent.protocol import MIGRATION, check_agent_url
from xfer.bundle import Bundle
from xfer.errors import BundleError, ForeignEntryError, MigrationCancelled, UsageError
from xfer.model import Kind, KindReport, VmIdentity
from xfer.transfer import ImportReport, Options, import_order

# How long a forgotten migration is remembered: far beyond any request's timeout.
FORGOTTEN_MEMORY_S = 3600.0


class TransferApi(Protocol):
    """The part of ``xfer.transfer`` the agent uses (the module itself satisfies it)."""

    def export_bundle(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
                      device: str | None = None, options: Options | None = None) -> Bundle: ...

    def import_bundle(self, bundle: Bundle, namespace: str | None = None, *,
                      vm: VmIdentity | None = None, kinds: Sequence[Kind] | None = None,
                      options: Options | None = None) -> ImportReport: ...

    def forget(self, vm: VmIdentity, kinds: Sequence[Kind], namespace: str | None = None, *,
               options: Options | None = None) -> dict[Kind, KindReport]: ...


class Peers(Protocol):
    """How an agent reaches other agents (``xfer.agent.client.PeerPool``)."""

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes: ...

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind]) -> dict[str, Any]: ...

    async def precopy_changes(self, url: str, vm: VmIdentity, cursor: str) -> bytes: ...

    async def precopy_stage(self, url: str, data: bytes, vm: VmIdentity, *,
                            final: bool = False) -> dict[str, Any]: ...


@dataclass
class Trace:
    """Time of each phase of one request and entries moved per kind (for logs and metrics)."""

    phases: dict[str, float] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    vm: str = ""
    kinds: tuple[str, ...] = ()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def about(self, vm: VmIdentity, kinds: Sequence[Kind]) -> None:
        self.vm = ",".join(vm.addresses) or ",".join(vm.macs)
        self.kinds = tuple(k.value for k in kinds)


class AgentService:
    """One device's operations. ``transfer`` defaults to ``xfer.transfer``.

    >>> svc = AgentService(config, peers=pool)            # doctest: +SKIP
    >>> await svc.push(vm, [Kind.CONNTRACK], "https://10.0.4.2:7443", Trace())  # doctest: +SKIP
    """

    def __init__(self, config: AgentConfig, transfer: TransferApi | None = None,
                 peers: Peers | None = None, key: bytes | None = None,
                 precopy_kernel: tuple[Any, Any] | None = None) -> None:
        real = transfer is None
        if transfer is None:
            from xfer import transfer as transfer_module

            transfer = transfer_module
        self.config = config
        self.transfer: TransferApi = transfer
        self.peers = peers
        self.key = key
        self.journal = Journal(config.state_dir)
        # Carried counts go to the first counting interface: totals are summed over
        # all of them at export, and which port the VM lands on is not known here.
        self.import_options: Options = ({Kind.COUNTERS: {"dev": config.counter_interfaces[0]}}
                                        if config.counter_interfaces else {})
        # One import or forget at a time: the journal then names at most one
        # request under way, and two pushes of one VM cannot interleave.
        self._kernel_lock = asyncio.Lock()
        self._forgotten: dict[str, float] = {}   # migration -> when its state was forgotten here
        from xfer.agent.precopyops import PrecopyOps

        # With [privsep] the tracker and the stages live in the privileged helper (ctnetlink).
        self.precopy = PrecopyOps(self, trust_seed=config.precopy_events_trusted,
                                  expire_s=config.precopy_expire_s, kernel=precopy_kernel)
        # Concurrent conntrack exports share one table walk (or the pre-copy index): with the
        # real transfer API only (tests give fakes that count their calls).
        self.shared: SharedExports | None = None
        if real and config.holds(Kind.CONNTRACK):
            self.shared = SharedExports(config.netns, lambda: self.precopy.source.started)

    # --- validation ------------------------------------------------------------------------

    def held(self, kinds: Sequence[Kind]) -> tuple[Kind, ...]:
        """``kinds`` if this device holds every one of them; refuse the request otherwise."""
        missing = [k.value for k in kinds if not self.config.holds(k)]
        if missing:
            raise UsageError(f"device {self.config.device_id} does not hold {', '.join(missing)} "
                             f"(it holds {', '.join(k.value for k in self.config.kinds)})")
        if not kinds:
            raise UsageError("no kind requested")
        return tuple(kinds)

    def decode(self, data: bytes, vm: VmIdentity,
               kinds: Sequence[Kind] | None) -> tuple[Bundle, tuple[Kind, ...]]:
        """Check a bundle against the request before anything touches the kernel.

        Returns the bundle and the kinds to import: those requested, or every
        section's. Raises (and changes nothing) when the bundle is too large,
        corrupt, unsigned while a key is set, for another VM, lacks a requested
        kind or carries a kind this device does not hold.
        """
        limit = self.config.max_bundle_bytes
        if len(data) > limit:
            raise BundleError(f"bundle is {len(data)} bytes, over this device's limit of {limit}")
        bundle = bundle_mod.decode(data, self.key, limit)
        if not vm.same_vm(bundle.vm):
            raise ForeignEntryError(
                f"bundle holds state of VM {bundle.vm.id} ({', '.join(bundle.vm.addresses)}), "
                f"not of the VM named in the request ({', '.join(vm.addresses)}); nothing imported")
        wanted = tuple(kinds) if kinds else tuple(bundle.sections)
        self.held(wanted)
        absent = [k.value for k in wanted if k not in bundle.sections]
        if absent:
            raise BundleError(f"bundle has no {', '.join(absent)} section; nothing imported")
        return bundle, wanted

    # --- operations --------------------------------------------------------------------

    async def export(self, vm: VmIdentity, kinds: Sequence[Kind], trace: Trace) -> tuple[Bundle, bytes]:
        """The VM's state of ``kinds`` on this device, as bundle bytes (signed if a key is set)."""
        kinds = self.held(kinds)
        trace.about(vm, kinds)
        with trace.phase("export"):
            if self.shared is not None and Kind.CONNTRACK in kinds:
                bundle = await self._export_shared(vm, kinds)
            else:
                bundle = await asyncio.to_thread(self.transfer.export_bundle, vm, kinds, self.config.netns,
                                                 device=self.config.device_id)
        with trace.phase("encode"):
            data = bundle_mod.encode(bundle, self.key)
        for kind, section in bundle.sections.items():
            trace.entries[kind.value] = section.count
        return bundle, data

    async def _export_shared(self, vm: VmIdentity, kinds: Sequence[Kind]) -> Bundle:
        """The bundle, its conntrack section from the shared walk (or the index)."""
        assert self.shared is not None
        from xfer.conntrack.shared import section_of

        others = [k for k in kinds if k != Kind.CONNTRACK]
        entries, rest = await asyncio.gather(
            self.shared.export(vm),
            asyncio.to_thread(self.transfer.export_bundle, vm, others, self.config.netns,
                              device=self.config.device_id))
        sections = {Kind.CONNTRACK: section_of(entries), **rest.sections}
        return Bundle(vm=vm, source=rest.source, sections={k: sections[k] for k in kinds})

    async def import_(self, data: bytes, vm: VmIdentity, kinds: Sequence[Kind] | None,
                      trace: Trace) -> ImportReport:
        """Import a bundle for ``vm``; each kind all-or-nothing; see the module docstring."""
        trace.about(vm, kinds or ())
        with trace.phase("decode"):
            bundle, wanted = self.decode(data, vm, kinds)
        trace.about(vm, wanted)
        async with self._kernel_lock:
            # Under the lock: a forget received before this import got it has been recorded.
            self.check_live()
            with trace.phase("import"):
                report = await asyncio.to_thread(self._import_journaled, bundle, vm, wanted)
        for kind, r in report.kinds.items():
            if kind not in report.errors:
                trace.entries[kind.value] = r.created + r.updated
        return report

    def _import_journaled(self, bundle: Bundle, vm: VmIdentity, kinds: tuple[Kind, ...]) -> ImportReport:
        netns = self.config.netns
        marker = self.journal.begin(bundle.id, vm, kinds, netns)
        merged = ImportReport()
        committed: list[Kind] = []
        started = time.perf_counter()
        try:
            for kind in import_order(kinds):
                # One kind at a time, so that we know which ones to undo if a later one is refused.
                report = self.transfer.import_bundle(bundle, netns, vm=vm, kinds=[kind],
                                                     options=self.import_options)
                merged.kinds.update(report.kinds)
                merged.errors.update(report.errors)
                if kind not in report.errors:
                    committed.append(kind)
        except Exception:
            if committed:
                # Leave the marker if this raises: the restarted agent will undo it.
                self.transfer.forget(vm, committed, netns)
            self.journal.end(marker)
            raise
        self.journal.end(marker)
        merged.seconds = time.perf_counter() - started
        return merged

    async def forget(self, vm: VmIdentity, kinds: Sequence[Kind], trace: Trace) -> dict[Kind, KindReport]:
        """Delete the VM's state of ``kinds`` here (asked for once the destination committed)."""
        kinds = self.held(kinds)
        trace.about(vm, kinds)
        migration = MIGRATION.get()
        if migration:
            # Before waiting for the lock: imports of this migration queued behind it are refused.
            now = time.monotonic()
            self._forgotten = {m: t for m, t in self._forgotten.items() if now - t < FORGOTTEN_MEMORY_S}
            self._forgotten[migration] = now
        async with self._kernel_lock:
            if Kind.CONNTRACK in kinds:
                # a rollback here: what a pre-copy staged goes too
                await asyncio.to_thread(self.precopy.forget_vm, vm)
            with trace.phase("forget"):
                reports = await asyncio.to_thread(self.transfer.forget, vm, kinds, self.config.netns)
        for kind, r in reports.items():
            trace.entries[kind.value] = r.deleted
        return reports

    def check_live(self) -> None:
        """Refuse work of a migration whose state was forgotten here since (rolled back)."""
        migration = MIGRATION.get()
        if migration and migration in self._forgotten:
            raise MigrationCancelled(f"migration {migration} was rolled back on device "
                                     f"{self.config.device_id}; nothing imported")

    def _peers(self) -> Peers:
        if self.peers is None:
            raise UsageError(f"device {self.config.device_id} has no client to reach other agents")
        return self.peers

    async def push(self, vm: VmIdentity, kinds: Sequence[Kind], destination: str,
                   trace: Trace) -> dict[str, Any]:
        """Export here and send straight to the destination agent; nothing is deleted here."""
        destination = check_agent_url(destination)
        peers = self._peers()
        bundle, data = await self.export(vm, kinds, trace)
        # The destination checks the migration too (the header travels on): a rollback
        # there since the manager asked is not overtaken by this import.
        with trace.phase("send"):
            report = await peers.import_(destination, data, vm, tuple(bundle.sections))
        return {"destination": destination, "bundle": bundle.id, "bytes": len(data),
                "exported": {k.value: s.count for k, s in bundle.sections.items()},
                "source_phases_ms": {k: round(v * 1000, 3) for k, v in trace.phases.items()},
                "report": report, "ok": _report_ok(report)}

    async def pull(self, vm: VmIdentity, kinds: Sequence[Kind], source: str,
                   trace: Trace) -> ImportReport:
        """Fetch the VM's state straight from the source agent and import it here."""
        source = check_agent_url(source)
        kinds = self.held(kinds)
        peers = self._peers()
        self.check_live()
        with trace.phase("fetch"):
            data = await peers.export(source, vm, kinds)
        return await self.import_(data, vm, kinds, trace)

    # --- lifecycle and status ------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """Roll back every import a previous run left unfinished. Run before serving.

        The rollback forgets the VM's state of the unfinished kinds on this device:
        a device the VM migrates *into* held none of it before the import.
        """
        done = []
        for item in self.journal.unfinished():
            kinds = [k for k in item.kinds if self.config.holds(k)]
            reports = self.transfer.forget(item.vm, kinds, item.netns) if kinds else {}
            self.journal.end(item.path)
            done.append({"bundle": item.bundle_id, "vm": item.vm.to_dict(),
                         "kinds": [k.value for k in kinds],
                         "deleted": {k.value: r.deleted for k, r in reports.items()}})
        return done

    def capabilities(self) -> dict[str, Any]:
        c = self.config
        return {"device": c.device_id, "type": c.device_type, "kinds": [k.value for k in c.kinds],
                "netns": c.netns, "signed_bundles": self.key is not None,
                "max_bundle_bytes": c.max_bundle_bytes,
                "operations": ["export", "import", "forget", "push", "pull", "precopy"]}


def _report_ok(report: dict[str, Any]) -> bool:
    kinds = report.get("kinds", {})
    return report.get("failed", 0) == 0 and not any("error" in k for k in kinds.values())
