"""Prometheus metrics of one agent, in a registry of its own (no process-wide default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from xfer.agent.service import Trace

# From 1 ms (a small bundle on a warm connection) to 30 s (millions of entries).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class AgentMetrics:
    """Requests by operation and outcome, entries moved by kind, durations.

    >>> m = AgentMetrics(); m.observe("export", "ok", 0.01, Trace()); b"xfer_agent" in m.render()
    True
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("xfer_agent_requests", "Requests by operation and outcome",
                                ["op", "outcome"], registry=self.registry)
        self.entries = Counter("xfer_agent_entries", "Entries exported, imported or deleted",
                               ["op", "kind"], registry=self.registry)
        self.duration = Histogram("xfer_agent_request_seconds", "Request duration", ["op"],
                                  buckets=_BUCKETS, registry=self.registry)
        self.phase = Histogram("xfer_agent_phase_seconds", "Duration of each phase of a request",
                               ["op", "phase"], buckets=_BUCKETS, registry=self.registry)

    def observe(self, op: str, outcome: str, seconds: float, trace: Trace) -> None:
        self.requests.labels(op, outcome).inc()
        self.duration.labels(op).observe(seconds)
        for name, value in trace.phases.items():
            self.phase.labels(op, name).observe(value)
        if outcome == "ok":
            for kind, n in trace.entries.items():
                self.entries.labels(op, kind).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
