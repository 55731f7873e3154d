"""What one migration window cost: QEMU's downtime, the guest gap, the transfer, the overhead.

All instants are ``time.time()`` seconds, the scale of QMP event timestamps, so
QEMU's STOP/RESUME times and ours compare directly (same host, same clock).

    r = WindowReport(vm="vm1")
    r.to_dict()["outcome"]     # "pending" until the window has been ended
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOMES = {
    "moved": "state moved, migration continued",
    "cancelled": "state not moved: migration cancelled, the source guest runs again",
    "continued-without-state": "STATE NOT MOVED: the VM moved WITHOUT its network state",
    "observed": "message sent when the guest stopped; the window was not ours, ordering NOT guaranteed",
    "observed-failed": "message failed; the window was not ours: the VM moved WITHOUT its state",
    "unhooked": "migration without the hook: no state moved (baseline)",
    "stale-cancelled": "found a pause window left open by an earlier run: migration cancelled",
    "stale-continued": "found a pause window left open by an earlier run: migration continued "
                       "WITHOUT its network state",
}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass
class WindowReport:
    """One hook run. ``ok`` only when the state moved and the migration completed."""

    vm: str
    outcome: str = "pending"
    status: str | None = None          # QEMU's final migration status
    error: str | None = None
    opened: float | None = None        # QEMU entered pre-switchover
    ended: float | None = None         # migrate-continue / migrate_cancel sent
    end_acked: float | None = None     # ... and answered
    transfer_s: float | None = None    # message sent -> manager's answer
    downtime_ms: float | None = None   # query-migrate "downtime"
    total_time_ms: float | None = None
    stop: float | None = None          # source STOP event
    resume: float | None = None        # destination RESUME event (qemu-migrate only)
    switchover: float | None = None    # source MIGRATION completed (observer mode)
    manager: list[dict[str, Any]] = field(default_factory=list)
    precopy: dict[str, Any] | None = None  # the manager's answer to "migrating", if sent

    @property
    def ok(self) -> bool:
        return self.outcome in ("moved", "observed") and self.status == "completed"

    @property
    def window_s(self) -> float | None:
        """How long the window was held, from QEMU entering it to our ending it."""
        return None if self.opened is None or self.ended is None else self.ended - self.opened

    @property
    def overhead_s(self) -> float | None:
        """Window held minus the transfer: what the hook itself added to the downtime."""
        w = self.window_s
        return None if w is None or self.transfer_s is None else w - self.transfer_s

    @property
    def unordered_s(self) -> float | None:
        """Observer mode: how long after the source handed over the manager answered (0: in time)."""
        if self.switchover is None or self.ended is None:
            return None
        return max(0.0, self.ended - self.switchover)

    @property
    def guest_gap_s(self) -> float | None:
        """Source STOP to destination RESUME: how long the guest ran nowhere."""
        return None if self.stop is None or self.resume is None else self.resume - self.stop

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("opened", "ended", "end_acked", "stop", "resume", "switchover", "transfer_s"):
            out.pop(key)
        out.update(ok=self.ok, meaning=OUTCOMES.get(self.outcome, self.outcome),
                   window_ms=_ms(self.window_s), transfer_ms=_ms(self.transfer_s),
                   overhead_ms=_ms(self.overhead_s), guest_gap_ms=_ms(self.guest_gap_s),
                   # QEMU's own part: guest stopped -> window entered.
                   window_entry_ms=_ms(None if self.stop is None or self.opened is None
                                       else self.opened - self.stop),
                   end_ack_ms=_ms(None if self.ended is None or self.end_acked is None
                                  else self.end_acked - self.ended),
                   unordered_ms=_ms(self.unordered_s),
                   stop_ts=self.stop, resume_ts=self.resume, window_opened_ts=self.opened)
        return out

    def lines(self) -> list[str]:
        """Human-readable summary, one fact a line."""
        d = self.to_dict()
        out = [f"vm {self.vm}: {d['meaning']} (migration {self.status or 'unknown'})"]
        if self.error:
            out.append(f"  reason: {self.error}")
        for key, label in (("downtime_ms", "QEMU downtime"), ("guest_gap_ms", "guest gap (STOP→RESUME)"),
                           ("window_ms", "window held"), ("transfer_ms", "state transfer"),
                           ("overhead_ms", "hook overhead"),
                           ("unordered_ms", "state arrived after the switchover by")):
            if d[key] is not None:
                out.append(f"  {label}: {d[key]:.1f} ms")
        return out
