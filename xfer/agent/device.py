"""Bring a device up for the kinds it holds: attach the datapath each kind needs.

``conntrack`` needs nothing (the kernel keeps the table). ``counters`` attaches
the counting tc program to each VM-facing interface; ``dhcp`` attaches the
snooper (trusted and untrusted ports) and keeps its database file in shape
while the agent runs. Attaching is idempotent, and nothing is detached when the
agent stops: the datapath (counting, IP source guard) must outlive a restart of
the agent, and its maps are pinned.

    report = bring_up(config)            # {"counters": {...}, "dhcp": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from xfer.agent.config import AgentConfig
from xfer.model import Kind

log = logging.getLogger("xfer.agent")


def _kind_package(module: str) -> Any:
    """Import a kind's device module, or None when this build of xfer lacks the kind."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("xfer."):
            return None
        raise


def bring_up(config: AgentConfig) -> dict[str, Any]:
    """Attach what each kind the device holds needs; returns what was done per kind.

    Needs CAP_NET_ADMIN and CAP_BPF (tc, BPF maps) and CAP_SYS_ADMIN for a namespace.

    >>> bring_up(load(Path("/etc/xfer/agent.toml")))     # doctest: +SKIP
    {'counters': {'interfaces': {'vm0': '/run/xfer/bpf/fw/vm0'}}}
    """
    done: dict[str, Any] = {}
    if Kind.COUNTERS in config.kinds:
        counters = _kind_package("xfer.counters.device")
        if counters is None:
            done["counters"] = {"error": "counters are not available in this build of xfer"}
        else:
            done["counters"] = {"interfaces": {dev: str(counters.attach(dev, config.netns))
                                               for dev in config.counter_interfaces}}
    if Kind.DHCP in config.kinds:
        dhcp = _kind_package("xfer.dhcp.device")
        if dhcp is None:
            done["dhcp"] = {"error": "dhcp snooping is not available in this build of xfer"}
        else:
            report = dhcp.attach(config.netns, [config.dhcp_trusted], list(config.dhcp_untrusted))
            done["dhcp"] = {"ports": dict(report.ports), "restored": report.restored,
                            "warnings": list(report.warnings)}
    return done


class DhcpKeeper:
    """The DHCP snooper's database keeper (``xfer dhcp serve``) as a task of the agent.

    >>> keeper = DhcpKeeper("fw"); await keeper.start(); ...; await keeper.stop()  # doctest: +SKIP
    """

    def __init__(self, namespace: str | None, interval: float = 1.0) -> None:
        self.namespace = namespace
        self.interval = interval
        self._snooper: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Start keeping the database; False when this build has no DHCP snooping."""
        serve = _kind_package("xfer.dhcp.serve")
        if serve is None:
            return False
        self._snooper = serve.Snooper(self.namespace, interval=self.interval)
        self._task = asyncio.create_task(self._snooper.run(install_signals=False))
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._snooper.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled() and self._task.exception() is not None:
            log.warning("dhcp database keeper failed: %s", self._task.exception())
        self._task = None
