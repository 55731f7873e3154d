"""``privsep.separate`` checks every thread of the agent for capabilities after the drop;
a worker thread that exits between the listing and the read must not stop the agent
(it did: FileNotFoundError on /proc/self/task/N/status, seen in ``xfer bench precopy --privsep``,
and ProcessLookupError when the file was opened just before the thread went, seen in the
netns pre-copy tests with [privsep])."""

from __future__ import annotations

import os
import threading
import time

from xfer.agent import privsep


def test_a_thread_gone_since_the_listing_holds_nothing() -> None:
    done = threading.Event()
    t = threading.Thread(target=done.wait)
    t.start()
    tid = str(t.native_id)
    assert tid in os.listdir("/proc/self/task")
    assert privsep._thread_capabilities(tid) == privsep.effective_capabilities(f"self/task/{tid}")
    done.set()
    t.join()
    deadline = time.monotonic() + 5
    while tid in os.listdir("/proc/self/task"):     # the kernel reaps it just after the join
        assert time.monotonic() < deadline, "the thread's /proc entry stayed"
        time.sleep(0.01)
    assert privsep._thread_capabilities(tid) == 0


def test_a_thread_gone_while_its_status_is_read_holds_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # /proc/self/task/N/status opened, then the thread exits: reading it fails with ESRCH.
    def gone(pid: object = "self") -> int:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(privsep, "effective_capabilities", gone)
    assert privsep._thread_capabilities("12345") == 0
