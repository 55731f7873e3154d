"""What every daemon's Prometheus registry holds besides its own metrics: the build and the
process (CPU, memory, open files, start time from /proc).

One registry per daemon object, no process-wide default: two servers in one test
process must not share counters.

    registry = daemon_registry("agent")
    # xfer_build_info{daemon="agent",python="3.11.2",version="0.1.0"} 1.0
    # process_resident_memory_bytes ...
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

import xfer


def daemon_registry(daemon: str) -> CollectorRegistry:
    """A fresh registry with ``xfer_build_info`` and the process collector."""
    registry = CollectorRegistry()
    info = Gauge("xfer_build_info", "The running xfer: version and Python (always 1)",
                 ["daemon", "version", "python"], registry=registry)
    info.labels(daemon, xfer.__version__, platform.python_version()).set(1)
    ProcessCollector(registry=registry)
    return registry
