"""A device's binding table: the pinned maps, read and changed through bpf(2), and its file.

No bcc here: listing, adding, exporting and importing bindings open the pinned
maps directly (microseconds), so they fit in a migration's pause window and
work from any process while the program keeps running in the kernel.

    with BindingTable("fw-dst") as table:
        table.add([Binding("02:00:00:00:00:02", "10.0.0.2", 3600.0, "vm0")])
        print(table.bindings())
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from xfer import netns
from xfer.dhcp import abi, persist
from xfer.dhcp.maps import TypedMap
from xfer.dhcp.model import Binding, mac_bytes, mac_text
from xfer.ebpf import loader
from xfer.errors import BPFLoadError

MAP_NAMES = ("bindings", "dhcp_by_mac", "clients", "ports", "stats", "port_bound",
             "port_bound_adj", "refusals")
PIN_NAME = "dhcpsnoop"
TABLE_SIZE = 4096      # MAX_BINDINGS in dhcpsnoop.bpf.c: bindings the device holds in all
_U64 = (1 << 64) - 1


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


def _signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


@dataclass
class Port:
    name: str
    ifindex: int
    role: str       # "trusted" | "untrusted"
    mode: str       # "enforce" | "observe"
    max_bindings: int | None = None     # bindings DHCP may add on the port; None: no limit
    bindings: int = 0                   # bindings the port holds now

    def to_json(self) -> dict[str, Any]:
        return {"port": self.name, "role": self.role, "mode": self.mode,
                "max_bindings": self.max_bindings, "bindings": self.bindings}


def port_limit(cfg: abi.PortCfg) -> int | None:
    """The limit a port's config means (0: the datapath's default; NO_PORT_LIMIT: none)."""
    if cfg.max_bindings == abi.NO_PORT_LIMIT:
        return None
    return int(cfg.max_bindings) or abi.DEFAULT_MAX_BINDINGS


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
        usage = self.port_usage()
        for key, cfg in items:
            idx = int(key.value)
            out.append(Port(self.ifname(idx) or "", idx,
                            "trusted" if cfg.role == abi.ROLE_TRUSTED else "untrusted",
                            "observe" if cfg.mode == abi.MODE_OBSERVE else "enforce",
                            port_limit(cfg), usage.get(idx, 0)))
        return sorted(out, key=lambda p: p.name)

    # --- per-port usage: what the datapath counted plus what user space adjusted ----------

    def _usage_map(self, name: str) -> TypedMap[Any, Any] | None:
        try:
            return self._open(name, abi.U32, abi.U64)
        except BPFLoadError:
            return None     # a program from before per-port limits: nothing to keep

    def port_usage(self) -> dict[int, int]:
        """Bindings held per port ifindex (0: imported for any port, not yet pinned)."""
        total: Counter[int] = Counter()
        for name in ("port_bound", "port_bound_adj"):
            m = self._usage_map(name)
            for key, value in (m.items() if m is not None else []):
                total[int(key.value)] += int(value.value)
        # both are u64 and either may be "negative" alone (wrapped): only their sum counts
        return {k: _signed(v) for k, v in total.items()}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize user-space writers of ``port_bound_adj`` (flock on the pin directory)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _adjust(self, deltas: Counter[int]) -> None:
        deltas = Counter({k: v for k, v in deltas.items() if v})
        adj = self._usage_map("port_bound_adj") if deltas else None
        if adj is None:
            return
        with self._locked():
            for ifindex, delta in deltas.items():
                cur = adj.get(abi.U32(ifindex))
                adj.put(abi.U32(ifindex), abi.U64(((int(cur.value) if cur else 0) + delta) & _U64))

    def refusals(self) -> dict[str, tuple[str, str, str]]:
        """The last binding each port was refused: port -> (reason counter, MAC, IP)."""
        try:
            m = self._open("refusals", abi.U32, abi.Refusal)
        except BPFLoadError:
            return {}
        out = {}
        for key, r in m.items():
            try:
                reason = abi.Counter(r.counter).name.lower()
            except ValueError:
                continue
            out[self.ifname(int(key.value)) or str(key.value)] = (
                reason, mac_text(bytes(r.mac)), socket.inet_ntoa(bytes(r.ip)))
        return out

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
        moved: Counter[int] = Counter()
        for b in bindings:
            ifindex = self._resolve_port(b, result.warnings)
            key, value = b.to_datapath(now, ifindex)
            old = self.map.get(key)
            existed = old is not None
            if existed and not replace_existing:
                continue
            self.map.put(key, value)
            # Counted but never refused: an operator or an authenticated migration put it here.
            moved[ifindex] += 1
            if old is not None:
                moved[int(old.ifindex)] -= 1
            if b.source == "dhcp":
                mk = abi.MacKey()
                mk.mac[:] = mac_bytes(b.mac)
                self.by_mac.put(mk, key.ip)
            if existed:
                result.updated += 1
            else:
                result.created += 1
        self._adjust(moved)
        if save:
            self.save()
        return result

    def remove(self, bindings: Iterable[Binding], save: bool = True) -> int:
        """Delete bindings by (MAC, IP); returns how many were there."""
        removed = 0
        gone: Counter[int] = Counter()
        for b in bindings:
            key = b.key()
            mk = abi.MacKey()
            mk.mac[:] = key.mac
            cur = self.by_mac.get(mk)
            if cur is not None and bytes(cur) == bytes(key.ip):
                self.by_mac.delete(mk)
            value = self.map.get(key)
            if value is not None and self.map.delete(key):
                gone[int(value.ifindex)] -= 1
                removed += 1
        self._adjust(gone)
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

