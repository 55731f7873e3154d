"""Process-wide heap settings for the pause window (glibc malloc).

NOTE: glibc hands a freed block over its mmap threshold (128 KiB, raised as
blocks are freed) and a heap top over its trim threshold straight back to the
kernel; the next buffer of that size is page-faulted in again. A page fault
costs ~2.3 µs on the VMs measured: one 20,000-key counters dump faulted ~900
pages (+2 ms on 4 ms of syscalls), and how often it happens depends on the
order of earlier allocations. Fixed thresholds keep up to 64 MiB of freed
memory for reuse instead, which a process holding multi-MB bundles has anyway.

    keep_freed_memory()   # once, at process start (xfer.cli.main does)
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1   # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks above this are mapped afresh (and unmapped) each time
TRIM_THRESHOLD = 64 << 20  # free memory kept at the heap top before returning it


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds; False (nothing changed) on a libc without ``mallopt``."""
    try:
        # The interpreter's own symbols include libc's (no find_library: it runs ldconfig).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
