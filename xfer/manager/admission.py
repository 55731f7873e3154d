"""Admission control: a queue per device, and no start for work that cannot make its deadline.

Every move takes a slot on each device of its plan (``slots`` at once per device:
an agent serializes its kernel work, so more in flight only queue there). Before a
message is accepted, its wait is predicted from each device's queue and the
running mean of its recent move times; when the prediction exceeds the message's
deadline (its budget), the message is refused at once with 503 and Retry-After —
the hypervisor keeps the VM where it is (its guest never paused for nothing) and
asks again — instead of being queued into a pause it would overrun.

Budget policy (``budget_ms``): refused before it starts when predicted to miss
(above); once started, a move runs to its end even past its budget (stopping
halfway would need a rollback, which costs the paused VM more than finishing)
and is reported ``over_budget``.

    admission = Admission()
    admission.check(["fw-src", "fw-dst"], deadline_s=0.3)     # Overloaded, or fine
    async with admission.slot(["fw-src", "fw-dst"]):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from xfer.errors import Overloaded

DEFAULT_SLOTS = 4
# Weight of the newest sample in a device's mean move time.
EWMA_WEIGHT = 0.2
FIRST_GUESS_S = 0.0


@dataclass
class Mean:
    """A running mean of move times (one per class of move: full copy, pre-copied delta)."""

    seconds: float = FIRST_GUESS_S
    timed: int = 0

    def record(self, seconds: float) -> None:
        self.seconds = seconds if self.timed == 0 else (
            (1 - EWMA_WEIGHT) * self.seconds + EWMA_WEIGHT * seconds)
        self.timed += 1


@dataclass
class Lane:
    """One device's queue: moves in flight or waiting, and how long one takes."""

    slots: asyncio.Semaphore
    capacity: int
    depth: int = 0                 # admitted moves not finished (running or waiting)
    means: dict[str, Mean] = field(default_factory=dict)
    refused: int = 0
    waits: list[float] = field(default_factory=list)

    def mean(self, what: str) -> Mean:
        return self.means.setdefault(what, Mean())

    def predicted_wait_s(self, what: str = "full") -> float:
        """How long a move admitted now waits for the moves ahead of it (their mean is of
        moves like it): a move with nobody ahead is never refused, nor one of a class
        not timed yet (no refusal without evidence)."""
        ahead = self.depth // self.capacity       # full rounds of moves before ours
        mean = self.mean(what)
        if ahead == 0 or mean.timed == 0:
            return 0.0
        return (ahead + 1) * mean.seconds


class Admission:
    """Per-device lanes (see the module docstring)."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.capacity = slots
        self.lanes: dict[str, Lane] = {}

    def lane(self, device: str) -> Lane:
        lane = self.lanes.get(device)
        if lane is None:
            lane = self.lanes[device] = Lane(asyncio.Semaphore(self.capacity), self.capacity)
        return lane

    def predicted_s(self, devices: Iterable[str], what: str = "full") -> float:
        return max((self.lane(d).predicted_wait_s(what) for d in devices), default=0.0)

    def check(self, devices: Iterable[str], deadline_s: float | None, what: str = "full") -> float:
        """The predicted time to finish; Overloaded when it exceeds ``deadline_s``.
        ``what``: the class of move ("full", "precopy")."""
        devices = list(devices)
        predicted = self.predicted_s(devices, what)
        if deadline_s is not None and predicted > deadline_s:
            for d in devices:
                self.lane(d).refused += 1
            busiest = max(devices, key=lambda d: self.lane(d).predicted_wait_s(what))
            # when the queue ahead will have drained
            retry = max(1.0, predicted - deadline_s)
            raise Overloaded(f"device {busiest} is busy: this migration would take about "
                             f"{predicted * 1000:.0f} ms, over its deadline of {deadline_s * 1000:.0f} ms; "
                             f"not started, retry in {math.ceil(retry)} s", retry)
        return predicted

    @contextlib.asynccontextmanager
    async def slot(self, devices: Iterable[str], what: str = "full") -> AsyncIterator[None]:
        """Hold a slot on every device (taken in name order: no deadlock between moves)."""
        lanes = [self.lane(d) for d in sorted(set(devices))]
        for lane in lanes:
            lane.depth += 1
        taken: list[Lane] = []
        started = time.perf_counter()
        try:
            for lane in lanes:
                await lane.slots.acquire()
                taken.append(lane)
            ran = time.perf_counter()
            yield
            took = time.perf_counter() - ran
            for lane in lanes:
                lane.mean(what).record(took)
                lane.waits.append(ran - started)
                del lane.waits[:-100]
        finally:
            for lane in taken:
                lane.slots.release()
            for lane in lanes:
                lane.depth -= 1

    def depths(self) -> dict[str, int]:
        """Queue depth per device (the metric)."""
        return {d: lane.depth for d, lane in self.lanes.items()}
