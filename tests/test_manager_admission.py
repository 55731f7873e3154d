"""Admission control: per-device queues, refusal with a retry time when a deadline cannot be met."""

from __future__ import annotations

import asyncio

import pytest

from xfer.errors import Overloaded
from xfer.manager.admission import Admission


def test_nothing_is_refused_before_a_device_was_timed() -> None:
    assert Admission().check(["fw-a"], deadline_s=0.000001) == 0.0


def test_a_deep_queue_refuses_work_that_would_miss_its_deadline() -> None:
    async def scenario() -> None:
        adm = Admission(slots=1)
        release = asyncio.Event()

        async def move(seconds: float) -> None:
            async with adm.slot(["fw-a", "fw-b"]):
                await asyncio.sleep(seconds)
                await release.wait()

        release.set()
        await move(0.05)                      # one timed move: ~50 ms each
        release.clear()
        running = [asyncio.ensure_future(move(0)) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert adm.depths() == {"fw-a": 4, "fw-b": 4}
        with pytest.raises(Overloaded) as exc:
            adm.check(["fw-a"], deadline_s=0.1)   # 4 ahead + ours at ~50 ms each
        assert exc.value.retry_after_s >= 1
        assert adm.check(["fw-c"], deadline_s=0.1) == 0.0   # another device is free
        release.set()
        await asyncio.gather(*running)
        assert adm.depths() == {"fw-a": 0, "fw-b": 0, "fw-c": 0}
        assert adm.check(["fw-a"], deadline_s=0.3) == 0.0   # nobody ahead: never refused
        assert adm.check(["fw-a"], deadline_s=0.1, what="precopy") == 0.0  # not timed yet

    asyncio.run(scenario())
