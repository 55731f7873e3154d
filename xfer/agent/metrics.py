"""Prometheus metrics of one agent, in a registry of its own (no process-wide default).

Besides the agent's requests: ``xfer_build_info``, the process (``process_*``) and,
on a device that holds DHCP, the guard's per-port counters as read from its map at
scrape time (``xfer_dhcp_guard_drops_total`` by reason, ``xfer_dhcp_guard_events_total``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from xfer.agent.service import Trace
from xfer.net.metrics import daemon_registry

# From 1 ms (a small bundle on a warm connection) to 30 s (millions of entries).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    """Requests by operation and outcome, entries moved by kind, durations, the DHCP guard.

    >>> m = AgentMetrics(); m.observe("export", "ok", 0.01, Trace()); b"xfer_agent" in m.render()
    True
    """

    def __init__(self) -> None:
        self.registry = daemon_registry("agent")
        self.requests = Counter("xfer_agent_requests", "Requests by operation and outcome",
                                ["op", "outcome"], registry=self.registry)
        self.entries = Counter("xfer_agent_entries", "Entries exported, imported or deleted",
                               ["op", "kind"], registry=self.registry)
        self.duration = Histogram("xfer_agent_request_seconds", "Request duration", ["op"],
                                  buckets=_BUCKETS, registry=self.registry)
        self.phase = Histogram("xfer_agent_phase_seconds", "Duration of each phase of a request",
                               ["op", "phase"], buckets=_BUCKETS, registry=self.registry)
        # port -> counter name -> value, as ``status.dhcp_counters`` reads them.
        self.dhcp_ports: dict[str, dict[str, int]] = {}
        self.registry.register(_DhcpGuard(self))

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


class _DhcpGuard(Collector):
    """The guard's counters: the datapath keeps them, the agent only reports them."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        ports = self.metrics.dhcp_ports
        drops = CounterMetricFamily("xfer_dhcp_guard_drops", "Packets the DHCP guard dropped, by port "
                                    "and reason", labels=["port", "reason"])
        events = CounterMetricFamily("xfer_dhcp_guard_events", "What else the DHCP guard counted, by "
                                     "port (passed, observed, bindings added/removed...)",
                                     labels=["port", "event"])
        for port, values in sorted(ports.items()):
            for name, value in sorted(values.items()):
                if name.startswith("drop_"):
                    drops.add_metric([port, name.removeprefix("drop_")], value)
                else:
                    events.add_metric([port, name], value)
        yield drops
        yield events
