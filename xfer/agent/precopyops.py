"""An agent's pre-copy operations: the rules around ``precopy`` (kinds held, bundles,
signatures, the journal, the kernel lock) without HTTP.

- source: ``changes`` (a bundle with the VM's conntrack changes since a cursor);
  ``push`` sends them to a destination agent;
- destination: ``stage`` (a bundle from the source, ``final``: the pause's delta,
  then commit), ``pull`` fetches from the source itself, ``abort``.

The session is the migration's token (``MIGRATION``). A session staged here is
journaled like an import, so an agent that dies with entries staged forgets
them at restart (``AgentService.recover``). Stages with no news for
``expire_s`` are aborted by ``expire``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from xfer import bundle as bundle_mod
from xfer.agent.precopy import DEFAULT_EXPIRE_S, PrecopySource, PrecopyStages
from xfer.agent.protocol import MIGRATION, check_agent_url
from xfer.bundle import Bundle
from xfer.conntrack.delta import is_delta
from xfer.errors import BundleError, ForeignEntryError, UsageError
from xfer.model import Kind, VmIdentity


class Trace(Protocol):
    """What a request's trace offers (``xfer.agent.service.Trace``)."""

    entries: dict[str, int]

    def about(self, vm: VmIdentity, kinds: Sequence[Kind]) -> None: ...

    def phase(self, name: str) -> AbstractContextManager[None]: ...


class Host(Protocol):
    """The agent service around the pre-copy operations (``xfer.agent.service.AgentService``)."""

    config: Any
    key: bytes | None
    journal: Any
    _kernel_lock: asyncio.Lock

    def held(self, kinds: Sequence[Kind]) -> tuple[Kind, ...]: ...

    def check_live(self) -> None: ...

    def _peers(self) -> Any: ...


class PrecopyOps:
    """Pre-copy for one agent (``service.precopy``)."""

    def __init__(self, service: Host, *, trust_seed: bool = False,
                 expire_s: float = DEFAULT_EXPIRE_S, kernel: tuple[Any, Any] | None = None) -> None:
        """``kernel``: (source, stages) standing in for ``PrecopySource``/``PrecopyStages``
        (the privileged helper's, ``privsep.Helper.precopy``); by default this process's own."""
        self.service = service
        netns = service.config.netns
        self.source: PrecopySource = kernel[0] if kernel else PrecopySource(netns, trust_seed=trust_seed)
        self.stages: PrecopyStages = kernel[1] if kernel else PrecopyStages(netns, expire_s=expire_s)
        self._journal: dict[str, Path] = {}

    def _session(self) -> str:
        session = MIGRATION.get()
        if not session:
            raise UsageError("a pre-copy request must name its migration (Xfer-Migration header)")
        return session

    # --- source ---------------------------------------------------------------------------

    async def changes(self, vm: VmIdentity, cursor: str, trace: Trace) -> bytes:
        """Bundle bytes holding the VM's conntrack changes since ``cursor`` ("" : all)."""
        self.service.held([Kind.CONNTRACK])
        trace.about(vm, [Kind.CONNTRACK])
        with trace.phase("changes"):
            section = await asyncio.to_thread(self.source.changes, vm, cursor)
        trace.entries["conntrack"] = section.count
        source = {"device": self.service.config.device_id, "netns": self.service.config.netns}
        with trace.phase("encode"):
            return bundle_mod.encode(Bundle(vm, source, {Kind.CONNTRACK: section}), self.service.key)

    async def push(self, vm: VmIdentity, destination: str, cursor: str, final: bool,
                   trace: Trace) -> dict[str, Any]:
        """Send the changes since ``cursor`` straight to the destination agent."""
        destination = check_agent_url(destination)
        peers = self.service._peers()
        data = await self.changes(vm, cursor, trace)
        with trace.phase("send"):
            report: dict[str, Any] = await peers.precopy_stage(destination, data, vm, final=final)
        return report

    # --- destination --------------------------------------------------------------------------

    def decode(self, data: bytes, vm: VmIdentity) -> Bundle:
        """A pre-copy bundle for ``vm``, checked before anything touches the kernel."""
        svc = self.service
        svc.held([Kind.CONNTRACK])
        limit = svc.config.max_bundle_bytes
        if len(data) > limit:
            raise BundleError(f"bundle is {len(data)} bytes, over this device's limit of {limit}")
        bundle = bundle_mod.decode(data, svc.key, limit)
        if not vm.same_vm(bundle.vm):
            raise ForeignEntryError(f"bundle holds state of VM {bundle.vm.id}, not of the VM named "
                                    f"in the request; nothing staged")
        section = bundle.sections.get(Kind.CONNTRACK)
        if set(bundle.sections) != {Kind.CONNTRACK} or section is None or not is_delta(section):
            raise BundleError("a pre-copy bundle holds exactly one conntrack delta section")
        return bundle

    async def stage(self, data: bytes, vm: VmIdentity, final: bool, trace: Trace) -> dict[str, Any]:
        """Stage a pre-copy bundle; ``final``: the pause's delta, then commit."""
        session = self._session()
        trace.about(vm, [Kind.CONNTRACK])
        with trace.phase("decode"):
            bundle = self.decode(data, vm)
        section = bundle.sections[Kind.CONNTRACK]
        svc = self.service
        async with svc._kernel_lock:
            svc.check_live()
            if session not in self._journal:
                self._journal[session] = svc.journal.begin(f"precopy{session}", vm, [Kind.CONNTRACK],
                                                           svc.config.netns)
            with trace.phase("stage"):
                staged = await asyncio.to_thread(self.stages.stage, session, vm, section, final)
            if final:
                svc.journal.end(self._journal.pop(session))
        trace.entries["conntrack"] = section.count
        return {"session": session, "committed": final, **staged}

    async def pull(self, vm: VmIdentity, source: str, final: bool, trace: Trace) -> dict[str, Any]:
        """Fetch the changes since this stage's cursor from the source agent and stage them."""
        source = check_agent_url(source)
        session = self._session()
        self.service.held([Kind.CONNTRACK])
        # a thread: with [privsep] the stages are the helper's, one round trip away
        cursor = await asyncio.to_thread(self.stages.cursor, session)
        with trace.phase("fetch"):
            data = await self.service._peers().precopy_changes(source, vm, cursor)
        result: dict[str, Any] = await self.stage(data, vm, final, trace)
        return result

    async def abort(self, vm: VmIdentity, trace: Trace) -> dict[str, Any]:
        """Remove what the session staged here (nothing staged: nothing to do)."""
        session = self._session()
        trace.about(vm, [Kind.CONNTRACK])
        async with self.service._kernel_lock:
            with trace.phase("abort"):
                gone = await asyncio.to_thread(self.stages.abort, session)
            marker = self._journal.pop(session, None)
            if marker is not None:
                self.service.journal.end(marker)
        return {"session": session, "removed": gone}

    def forget_vm(self, vm: VmIdentity) -> None:
        """The VM's state here is being forgotten: its stages go with it."""
        self.stages.abort_vm(vm)

    async def expire(self) -> list[str]:
        """Abort stages without news for ``expire_s``; returns their sessions."""
        async with self.service._kernel_lock:
            gone = await asyncio.to_thread(self.stages.expire)
            for session in gone:
                marker = self._journal.pop(session, None)
                if marker is not None:
                    self.service.journal.end(marker)
        return gone

    def close(self) -> None:
        self.stages.close()
        self.source.close()
