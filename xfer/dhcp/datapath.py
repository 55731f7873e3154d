"""Attach and detach the snooping program on a device's ports. The privileged part.

Built on the shared loader (``xfer.ebpf.loader``: compile from package data,
clsact attach through pyroute2, BPFLoadError). Needs root: CAP_BPF and
CAP_PERFMON to load, CAP_NET_ADMIN to attach, CAP_SYS_ADMIN to enter a namespace.

All ports of a device share one set of maps, pinned in the device directory
(``store.pin_dir``) through ``-DDS_PIN_DIR``: the ACK seen on the trusted port
must create the binding the untrusted port checks. The loader compiles once per
interface, so each port runs its own instance of the program over those shared
maps; the ``ports`` map tells each instance its port's role and mode.

    attach("sw1", trusted=["uplink"], untrusted=["vm0", "vm1"], mode="enforce")
    detach("sw1", purge=True)
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from xfer import netns
from xfer.dhcp import abi
from xfer.dhcp.maps import TypedMap
from xfer.dhcp.store import MAP_NAMES, PIN_NAME, pin_dir
from xfer.ebpf import loader
from xfer.errors import UsageError

# Priority 0x0d5c runs before the counters program (0xc000) on a shared port (lower
# runs first), so what the source guard drops is never counted for the VM it pretends
# to be. The loader's docstring lists the priorities in use.
PROGRAM = loader.TcProgram("dhcpsnoop.bpf.c", {"ingress": "dhcpsnoop_ingress"}, prio=0x0D5C)
MODES = {"enforce": abi.MODE_ENFORCE, "observe": abi.MODE_OBSERVE}


@dataclass
class Attached:
    namespace: str | None
    pin_dir: str
    ports: dict[str, int]       # ifname -> ifindex
    fresh_maps: bool            # the maps were created now (nothing was pinned)


def source_text() -> str:
    """The program's C source (what ``xfer dhcp attach --ebpf`` prints)."""
    return loader.source_text(PROGRAM)


def _ifindexes(namespace: str | None, names: Sequence[str]) -> dict[str, int]:
    out = {}
    with netns.entered(namespace):
        for name in names:
            try:
                out[name] = socket.if_nametoindex(name)
            except OSError:
                raise UsageError(f"no interface {name!r} in "
                                 f"{namespace or 'this namespace'}") from None
    return out


def _ifname(namespace: str | None, index: int) -> str | None:
    try:
        with netns.entered(namespace):
            return socket.if_indextoname(index)
    except OSError:
        return None


def attach(namespace: str | None, trusted: Sequence[str], untrusted: Sequence[str],
           mode: str = "enforce") -> Attached:
    """Attach the program to the ports (idempotent: again replaces the program, keeps maps).

    >>> attach("fw-a", ["uplink"], ["vm0"], "observe")  # doctest: +SKIP
    """
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    overlap = set(trusted) & set(untrusted)
    if overlap:
        raise UsageError(f"ports both trusted and untrusted: {', '.join(sorted(overlap))}")
    if PIN_NAME in (*trusted, *untrusted):
        raise UsageError(f"a port may not be named {PIN_NAME!r} (its pin directory)")
    if not untrusted and not trusted:
        raise UsageError("no port given")
    ports = _ifindexes(namespace, [*trusted, *untrusted])
    pins = pin_dir(namespace)
    fresh = not os.path.exists(os.path.join(pins, "ports"))
    cflags = [f'-DDS_PIN_DIR="{pins}"']
    # NOTE: bcc creates only the last directory of a BPF_TABLE_PINNED path.
    loader.ensure_bpffs()
    os.makedirs(pins, exist_ok=True)
    order = list(ports)
    if fresh:
        # The first compile creates the maps, so that port runs unconfigured (and
        # lets everything through) until _configure, a millisecond later.
        loader.attach(PROGRAM, order.pop(0), namespace, cflags=cflags)
    _configure(pins, ports, trusted, mode)
    for name in order:
        loader.attach(PROGRAM, name, namespace, cflags=cflags)
    return Attached(namespace, pins, ports, fresh)


def _configure(pins: str, ports: dict[str, int], trusted: Sequence[str], mode: str) -> None:
    with TypedMap(os.path.join(pins, "ports"), abi.U32, abi.PortCfg) as pm:
        for name, index in ports.items():
            cfg = abi.PortCfg()
            cfg.role = abi.ROLE_TRUSTED if name in trusted else abi.ROLE_UNTRUSTED
            cfg.mode = MODES[mode]
            pm.put(abi.U32(index), cfg)


def detach(namespace: str | None, purge: bool = False) -> int:
    """Remove our filter from every configured port; ``purge`` also unpins the maps.

    Without ``purge`` the bindings stay pinned, so attaching again loses nothing.
    Returns the number of filters removed.
    """
    pins = pin_dir(namespace)
    removed = 0
    alive = namespace is None or netns.exists(namespace)
    if os.path.exists(os.path.join(pins, "ports")):
        with TypedMap(os.path.join(pins, "ports"), abi.U32, abi.PortCfg) as pm:
            for key in list(pm.keys()):
                name = _ifname(namespace, int(key.value)) if alive else None
                if name is not None:
                    removed += loader.detach(PROGRAM, name, namespace)
                    loader.unpin(PROGRAM, name, namespace)   # the empty per-port directory
                pm.delete(key)
    if purge:
        unpin(pins)
    return removed


def unpin(pins: str) -> None:
    """Remove the pinned maps (the kernel frees them once no program uses them)."""
    for name in MAP_NAMES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pins, name))
    with contextlib.suppress(OSError):
        os.rmdir(pins)
    parent = os.path.dirname(pins)
    # The loader leaves an empty directory per port; a port that is gone (its
    # namespace deleted, its link removed) could not be named at detach time.
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)   # only when empty: other programs' pins stay
    with contextlib.suppress(OSError):
        os.rmdir(parent)
