"""Pre-copy on one device, without HTTP: the source's sessions and the destination's stages.

Source side (``PrecopySource``): one ``Tracker`` for the device's namespace,
started at the first pre-copy and kept (its index stays warm for the VMs it
tracks); ``open`` gives a whole copy of the VM's conntrack entries and the cursor
it is current at, ``changes`` what changed since a cursor. Both are O(the VM's
entries or changes): no walk of the host's table.

Destination side (``PrecopyStages``): one ``Stage`` per (session, VM): deltas are
applied as they come; the final one commits; abort, or no news for ``expire_s``,
deletes what was staged (the source is never touched by any of this).

A session is the migration's token (the ``X-Xfer-Migration`` header). Kernel
work here is blocking: the agent runs it in a worker thread.

>>> src = PrecopySource("fw-src")                       # doctest: +SKIP
>>> section = src.open(vm, "m-17")                       # doctest: +SKIP
>>> stages = PrecopyStages("fw-dst"); stages.apply("m-17", vm, section)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from xfer.bundle import Section
from xfer.conntrack.delta import delta_section, read_delta
from xfer.conntrack.index import Changes, CursorExpired
from xfer.conntrack.staging import Stage, StageReport
from xfer.conntrack.stream import EMPTY
from xfer.conntrack.tracker import Tracker
from xfer.errors import UsageError
from xfer.model import VmIdentity

log = logging.getLogger(__name__)
DEFAULT_EXPIRE_S = 600.0


class PrecopySource:
    """The source device's tracker and which sessions use which VM."""

    def __init__(self, namespace: str | None, *, trust_seed: bool = False) -> None:
        self.namespace = namespace
        self.trust_seed = trust_seed
        self._tracker: Tracker | None = None
        self._lock = threading.Lock()

    @property
    def tracker(self) -> Tracker:
        with self._lock:
            if self._tracker is None:
                self._tracker = Tracker(self.namespace, trust_seed=self.trust_seed)
                self._tracker.start()
            return self._tracker

    @property
    def started(self) -> Tracker | None:
        """The tracker if pre-copy has started on this device (None: not yet)."""
        return self._tracker

    def open(self, vm: VmIdentity) -> Section:
        """The VM's entries now as a whole-copy delta section (tracking it from now on)."""
        tracker = self.tracker
        tracker.track([vm])
        entries, cursor = tracker.snapshot(vm.id)
        return delta_section(Changes(entries, EMPTY, cursor), base="")

    def changes(self, vm: VmIdentity, cursor: str) -> Section:
        """What changed since ``cursor`` ("" or an expired cursor: a whole copy)."""
        tracker = self.tracker
        if not cursor or vm.id not in tracker.index:
            return self.open(vm)
        try:
            return delta_section(tracker.changes(vm.id, cursor), base=cursor)
        except CursorExpired as exc:
            log.warning("%s; sending VM %s whole", exc, vm.id)
            return self.open(vm)

    def stats(self) -> dict[str, int]:
        t = self._tracker
        if t is None:
            return {"tracked_vms": 0, "events_applied": 0, "events_lost": 0, "resyncs": 0}
        return {"tracked_vms": len(t.index.tracked()), "events_applied": t.index.events_applied,
                "events_lost": t.lost, "resyncs": t.index.resyncs}

    def close(self) -> None:
        with self._lock:
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None


@dataclass
class Session:
    stage: Stage
    cursor: str
    deltas: int
    staged_at: float
    touched: float


class PrecopyStages:
    """The destination device's stages, by session; expired ones are aborted."""

    def __init__(self, namespace: str | None, *, expire_s: float = DEFAULT_EXPIRE_S) -> None:
        self.namespace = namespace
        self.expire_s = expire_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def apply(self, session: str, vm: VmIdentity, section: Section, *,
              final: bool = False) -> tuple[StageReport, Session]:
        """Stage a delta section for the session (the first must be a whole copy)."""
        delta = read_delta(section)
        with self._lock:
            state = self._sessions.get(session)
            if state is None:
                if not delta.whole:
                    raise UsageError(f"pre-copy session {session} is not staged here: a delta "
                                     "needs the whole copy first")
                state = Session(Stage(vm, self.namespace), "", 0, time.monotonic(), time.monotonic())
                self._sessions[session] = state
            elif not state.stage.vm.same_vm(vm):
                raise UsageError(f"pre-copy session {session} stages VM {state.stage.vm.id}, not {vm.id}")
            elif not delta.whole and delta.base != state.cursor and not _older(delta.base, state.cursor):
                raise UsageError(f"pre-copy delta starts at {delta.base}, the stage is at "
                                 f"{state.cursor}: send it from there")
        report = state.stage.apply(delta.upserts, delta.deletes, final=final, whole=delta.whole)
        state.cursor = delta.cursor
        state.deltas += 0 if delta.whole else 1
        state.touched = time.monotonic()
        return report, state

    def stage(self, session: str, vm: VmIdentity, section: Section, final: bool) -> dict[str, Any]:
        """``apply``, and with ``final`` ``commit``, in one call (the pause's one trip to the
        kernel, and to the privileged helper); the answer is plain data."""
        report, state = self.apply(session, vm, section, final=final)
        staged = len(state.stage.staged)
        if final:
            self.commit(session)
        return {"staged": staged, "deltas": state.deltas, "cursor": state.cursor, **report.to_dict()}

    def cursor(self, session: str) -> str:
        state = self._sessions.get(session)
        return state.cursor if state is not None else ""

    def commit(self, session: str) -> int:
        """The migration completed: the staged entries are the destination's own now."""
        with self._lock:
            state = self._sessions.pop(session, None)
        return state.stage.commit() if state is not None else 0

    def abort(self, session: str) -> int:
        """Delete what the session staged; returns how many entries went."""
        with self._lock:
            state = self._sessions.pop(session, None)
        return state.stage.abort() if state is not None else 0

    def abort_vm(self, vm: VmIdentity) -> int:
        """Abort every session staging ``vm`` (a forget of the VM here)."""
        with self._lock:
            mine = [s for s, st in self._sessions.items() if st.stage.vm.same_vm(vm)]
        return sum(self.abort(s) for s in mine)

    def expire(self, now: float | None = None) -> list[str]:
        """Abort sessions without news for ``expire_s``; returns their names."""
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [s for s, st in self._sessions.items() if now - st.touched > self.expire_s]
        for s in old:
            log.warning("pre-copy session %s expired after %.0f s without news; staged entries "
                        "removed", s, self.expire_s)
            self.abort(s)
        return old

    def sessions(self) -> dict[str, dict[str, object]]:
        return {s: {"vm": st.stage.vm.id, "staged": len(st.stage.staged), "deltas": st.deltas,
                    "cursor": st.cursor} for s, st in self._sessions.items()}

    def close(self) -> None:
        for s in list(self._sessions):
            self.abort(s)


def _older(base: str, current: str) -> bool:
    """Whether cursor ``base`` is at or before ``current`` in the same index: re-sending
    changes from an older point is harmless (the stage applies state, not steps)."""
    gb, _, sb = base.partition(":")
    gc, _, sc = current.partition(":")
    return gb == gc and sb.isdigit() and sc.isdigit() and int(sb) <= int(sc)
