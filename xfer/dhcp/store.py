"""A device's binding table: the pinned maps, read and changed through bpf(2), and its file.

No bcc here: listing, adding, exporting and importing bindings open the pinned
maps directly (microseconds), so they fit in a migration's pause window and
work from any process while the program keeps running in the kernel.

    with BindingTable("fw-dst") as table:
        table.add([Binding("02:00:00:00:00:02", "10.0.0.2", 3600.0, "vm0")])
        print(table.bindings())
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from xfer import netns
from xfer.dhcp import abi, persist
from xfer.dhcp.maps import TypedMap
from xfer.dhcp.model import Binding, mac_bytes
from xfer.ebpf import loader

MAP_NAMES = ("bindings", "dhcp_by_mac", "clients", "ports", "stats")
PIN_NAME = "dhcpsnoop"


def pin_dir(namespace: str | None, root: Path | None = None) -> str:
    """Where a device's maps are pinned: ``/run/xfer/bpf/<netns>/dhcpsnoop``.

    One directory per device, not per port: every port's program instance
    shares the binding table. (It sits beside the loader's per-interface
    directories, so no port may be named "dhcpsnoop".)
    """
    return str(loader.pin_dir(PIN_NAME, namespace, root or loader.PIN_ROOT))


def boot_ns() -> int:
    """CLOCK_BOOTTIME in ns: the clock bpf_ktime_get_boot_ns() reads in the datapath."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass
class Port:
    name: str
    ifindex: int
    role: str       # "trusted" | "untrusted"
    mode: str       # "enforce" | "observe"


@dataclass
class AddResult:
    created: int = 0
    updated: int = 0
    warnings: list[str] = field(default_factory=list)


class BindingTable:
    """The binding table of the DHCP snooper attached in ``namespace``.

    Raises BPFLoadError when nothing is attached there. ``db_path`` is the
    snooping database file (default: ``persist.default_path``); every change
    made through this class rewrites it.
    """

    def __init__(self, namespace: str | None = None, *, db_path: Path | None = None) -> None:
        self.namespace = namespace
        self.dir = pin_dir(namespace)
        self.db_path = db_path or persist.default_path(namespace)
        self._maps: dict[str, TypedMap[Any, Any]] = {}
        self._names: dict[int, str] = {}
        # opened now: a missing pin is reported here, not halfway through a change
        self._open("bindings", abi.BindingKey, abi.BindingValue)

    # The other maps open on first use: an export needs only `bindings`, and each
    # open is two syscalls inside the migration's pause window.
    def _open(self, name: str, key: type, value: type) -> TypedMap[Any, Any]:
        if name not in self._maps:
            self._maps[name] = TypedMap(os.path.join(self.dir, name), key, value)
        return self._maps[name]

    @property
    def map(self) -> TypedMap[Any, Any]:
        return self._open("bindings", abi.BindingKey, abi.BindingValue)

    @property
    def by_mac(self) -> TypedMap[Any, Any]:
        return self._open("dhcp_by_mac", abi.MacKey, abi.IPv4)

    @property
    def port_map(self) -> TypedMap[Any, Any]:
        return self._open("ports", abi.U32, abi.PortCfg)

    @property
    def stat_map(self) -> TypedMap[Any, Any]:
        return self._open("stats", abi.StatKey, abi.U64)

    def __enter__(self) -> BindingTable:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    # --- interfaces ----------------------------------------------------------------

    def _learn_names(self, indexes: Iterable[int]) -> None:
        missing = {i for i in indexes if i and i not in self._names}
        if not missing:
            return
        with netns.entered(self.namespace):    # one setns round trip for all of them
            for index in missing:
                try:
                    self._names[index] = socket.if_indextoname(index)
                except OSError:
                    self._names[index] = f"#{index}"   # the port was removed since

    def ifname(self, ifindex: int) -> str | None:
        if ifindex == 0:
            return None
        self._learn_names([ifindex])
        return self._names[ifindex]

    def ifindex(self, name: str) -> int | None:
        try:
            with netns.entered(self.namespace):
                return socket.if_nametoindex(name)
        except OSError:
            return None

    def ports(self) -> list[Port]:
        out = []
        items = self.port_map.items()
        self._learn_names(int(k.value) for k, _ in items)
        for key, cfg in items:
            idx = int(key.value)
            out.append(Port(self.ifname(idx) or "", idx,
                            "trusted" if cfg.role == abi.ROLE_TRUSTED else "untrusted",
                            "observe" if cfg.mode == abi.MODE_OBSERVE else "enforce"))
        return sorted(out, key=lambda p: p.name)

    def _resolve_port(self, b: Binding, warnings: list[str]) -> int:
        if b.port is not None:
            index = self.ifindex(b.port)
            cfg = self.port_map.get(abi.U32(index)) if index else None
            if cfg is not None and cfg.role == abi.ROLE_UNTRUSTED:
                return index   # type: ignore[return-value]
        untrusted = [p for p in self.ports() if p.role == "untrusted"]
        if len(untrusted) == 1:
            return untrusted[0].ifindex
        warnings.append(f"{b.mac} {b.ip}: port {b.port!r} is not an untrusted port here; "
                        "bound to any untrusted port until the VM's first packet")
        return 0

    # --- bindings ------------------------------------------------------------------

    def bindings(self, include_expired: bool = False) -> list[Binding]:
        """Every binding (unexpired ones unless asked), lease as remaining seconds."""
        now = boot_ns()
        items = self.map.items()
        self._learn_names(v.ifindex for _, v in items)
        out = [Binding.from_datapath(k, v, now, self.ifname(v.ifindex)) for k, v in items]
        if not include_expired:
            out = [b for b in out if not b.expired]
        return sorted(out, key=lambda b: (b.ip, b.mac))

    def add(self, bindings: Iterable[Binding], replace_existing: bool = True,
            save: bool = True) -> AddResult:
        """Install bindings (effective for the next packet); returns created/updated counts."""
        result = AddResult()
        now = boot_ns()
        for b in bindings:
            ifindex = self._resolve_port(b, result.warnings)
            key, value = b.to_datapath(now, ifindex)
            existed = self.map.get(key) is not None
            if existed and not replace_existing:
                continue
            self.map.put(key, value)
            if b.source == "dhcp":
                mk = abi.MacKey()
                mk.mac[:] = mac_bytes(b.mac)
                self.by_mac.put(mk, key.ip)
            if existed:
                result.updated += 1
            else:
                result.created += 1
        if save:
            self.save()
        return result

    def remove(self, bindings: Iterable[Binding], save: bool = True) -> int:
        """Delete bindings by (MAC, IP); returns how many were there."""
        removed = 0
        for b in bindings:
            key = b.key()
            mk = abi.MacKey()
            mk.mac[:] = key.mac
            cur = self.by_mac.get(mk)
            if cur is not None and bytes(cur) == bytes(key.ip):
                self.by_mac.delete(mk)
            removed += self.map.delete(key)
        if save:
            self.save()
        return removed

    def sweep(self) -> int:
        """Delete expired bindings (the datapath already refuses them); returns how many."""
        expired = [b for b in self.bindings(include_expired=True) if b.expired]
        return self.remove(expired, save=False) if expired else 0

    def counters(self) -> dict[str, dict[str, int]]:
        """Per port, per counter name (lower case), e.g. ``{"vm0": {"drop_source": 3}}``."""
        out: dict[str, dict[str, int]] = {}
        for key, value in self.stat_map.items():
            try:
                name = abi.Counter(key.counter).name.lower()
            except ValueError:
                continue
            port = self.ifname(key.ifindex) or str(key.ifindex)
            out.setdefault(port, {})[name] = int(value.value)
        return out

    # --- the snooping database file ---------------------------------------------------

    def save(self, sync: bool = True) -> None:
        """Write the snooping database file from the maps (see ``persist.save``)."""
        persist.save(self.db_path, self.bindings(), time.time(), sync)

    def restore(self) -> AddResult:
        """Install the file's valid bindings that the maps lack (after a reboot or reload)."""
        have = {(b.mac, b.ip) for b in self.bindings()}
        missing = [b for b in persist.load(self.db_path, time.time())
                   if (b.mac, b.ip) not in have]
        return self.add(missing, save=False) if missing else AddResult()

