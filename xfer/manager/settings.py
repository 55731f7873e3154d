"""How the manager runs migrations by default: mode, cleanup, budget, device timeout.

    >>> Settings(mode="store", cleanup="age-out").mode
    <Mode.STORE: 'store'>
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from xfer.errors import UsageError
from xfer.net.message import Mode

DEFAULT_BUDGET_MS = 300.0   # QEMU's default downtime limit
# How long the device-driven variant waits for the devices' own deposits and imports.
DEFAULT_DEVICE_TIMEOUT_S = 10.0


class Cleanup(StrEnum):
    """What happens at the source once every destination committed."""

    DELETE = "delete"     # the source devices forget the VM (after the answer)
    AGE_OUT = "age-out"   # nothing is deleted: the entries time out on their own

    @classmethod
    def of(cls, text: str) -> Cleanup:
        """The cleanup named ``text``; UsageError otherwise."""
        try:
            return cls(text)
        except ValueError:
            raise UsageError(f"cleanup {text!r} must be delete or age-out") from None


@dataclass(frozen=True)
class Settings:
    """The manager's defaults; a mode or cleanup given by name is checked and converted."""

    mode: Mode = Mode.RELAY
    cleanup: Cleanup = Cleanup.DELETE
    budget_ms: float = DEFAULT_BUDGET_MS
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S
    # pre-copy: seconds between rounds of changes, and how long a prepared migration waits
    # for its "not-running" before what it staged is removed
    precopy_interval_s: float = 0.5
    precopy_expire_s: float = 600.0

    def __post_init__(self) -> None:
        # Names are accepted (tests, callers that read them from a file) and converted.
        object.__setattr__(self, "mode", Mode.of(self.mode))
        object.__setattr__(self, "cleanup", Cleanup.of(self.cleanup))
        if not self.device_timeout_s > 0:
            raise UsageError("device_timeout_s must be a positive number of seconds")
        if not (self.precopy_interval_s > 0 and self.precopy_expire_s > 0):
            raise UsageError("precopy_interval_s and precopy_expire_s must be positive numbers of seconds")
