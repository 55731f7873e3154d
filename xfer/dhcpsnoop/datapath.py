"""Compile, load, attach and detach the snooping program. The privileged part.

Needs root: CAP_BPF and CAP_PERFMON to load, CAP_NET_ADMIN to attach tc filters,
CAP_SYS_ADMIN to enter a namespace. bcc and pyroute2 are imported here only, on
first use, so the commands that merely read or change bindings never pay for them.

One program instance serves every port of a device: the ``ports`` map tells it
each port's role and mode. Maps are pinned (``BPF_TABLE_PINNED``), so attaching
again (a new process, a changed program) reuses them and keeps every binding.

    attach("fw-a", trusted=["uplink"], untrusted=["vm0", "vm1"], mode="enforce")
    detach("fw-a", purge=True)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from xfer import netns
from xfer.dhcpsnoop import abi
from xfer.dhcpsnoop.bpfsys import MapNotPinned, PinnedMap
from xfer.dhcpsnoop.store import MAP_NAMES, pin_dir
from xfer.errors import BPFLoadError, UsageError

PROGRAM = "dhcpsnoop.bpf.c"
FUNCTION = "dhcpsnoop_ingress"
# tc filter priority and handle of ours on each port's clsact ingress hook, so we
# replace and delete only our own filter and leave others' (counters) alone.
TC_PRIO = 0x0D5C
TC_HANDLE = 1
MODES = {"enforce": abi.MODE_ENFORCE, "observe": abi.MODE_OBSERVE}


@dataclass
class Attached:
    namespace: str | None
    pin_dir: str
    ports: dict[str, int]       # ifname -> ifindex
    fresh_maps: bool            # the maps were created now (nothing was pinned)


def source_text() -> str:
    """The program's C source (what `xfer dhcp attach --ebpf` prints)."""
    return resources.files("xfer.ebpf").joinpath(PROGRAM).read_text()


def compile_program(pins: str) -> tuple[Any, Any]:
    """Compile and load the program against the maps pinned in ``pins`` (created if absent).

    Returns (bcc.BPF, function). Raises BPFLoadError with the compiler's or verifier's reason.
    """
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BPFLoadError(f"bcc is not importable ({exc}): install python3-bpfcc and use a "
                           "venv with --system-site-packages") from None
    os.makedirs(pins, exist_ok=True)
    with resources.as_file(resources.files("xfer.ebpf").joinpath(PROGRAM)) as path:
        cflags = [f"-I{path.parent}", f'-DPIN_DIR="{pins}"', "-w"]
        try:
            bpf = BPF(src_file=str(path).encode(), cflags=cflags)
            fn = bpf.load_func(FUNCTION.encode(), BPF.SCHED_CLS)
        except Exception as exc:  # bcc raises bare Exception for compile/verifier errors
            raise BPFLoadError(f"cannot load {PROGRAM}: {exc}") from None
    return bpf, fn


def _ifindexes(namespace: str | None, names: Sequence[str]) -> dict[str, int]:
    import socket

    out = {}
    with netns.entered(namespace):
        for name in names:
            try:
                out[name] = socket.if_nametoindex(name)
            except OSError:
                raise UsageError(f"no interface {name!r} in "
                                 f"{namespace or 'this namespace'}") from None
    return out


def _iproute(namespace: str | None) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=namespace) if namespace else IPRoute()


def _tc_attach(namespace: str | None, ports: dict[str, int], fd: int, name: str) -> None:
    from pyroute2 import NetlinkError

    with _iproute(namespace) as ipr:
        for ifname, index in ports.items():
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise BPFLoadError(f"clsact on {ifname}: {exc}") from None
            try:
                ipr.tc("replace-filter", "bpf", index, TC_HANDLE, fd=fd, name=name,
                       parent="ffff:fff2", classid=1, direct_action=True, prio=TC_PRIO)
            except NetlinkError as exc:
                raise BPFLoadError(f"tc ingress filter on {ifname}: {exc}") from None


def _tc_detach(namespace: str | None, indexes: Sequence[int]) -> int:
    from pyroute2 import NetlinkError

    removed = 0
    with _iproute(namespace) as ipr:
        for index in indexes:
            try:
                ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent="ffff:fff2", prio=TC_PRIO)
                removed += 1
            except NetlinkError as exc:
                # NOTE: a port removed meanwhile took its filters with it (ENODEV);
                # an absent filter is ENOENT (or EINVAL on some kernels).
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
    return removed


def attach(namespace: str | None, trusted: Sequence[str], untrusted: Sequence[str],
           mode: str = "enforce", bpf_root: str | None = None) -> Attached:
    """Attach the program to the ports (idempotent: again replaces the program, keeps maps).

    >>> attach("fw-a", ["uplink"], ["vm0"], "observe")  # doctest: +SKIP
    """
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    overlap = set(trusted) & set(untrusted)
    if overlap:
        raise UsageError(f"ports both trusted and untrusted: {', '.join(sorted(overlap))}")
    if not untrusted and not trusted:
        raise UsageError("no port given")
    ports = _ifindexes(namespace, [*trusted, *untrusted])
    pins = pin_dir(namespace, bpf_root)
    fresh = not os.path.exists(os.path.join(pins, "bindings"))
    bpf, fn = compile_program(pins)
    try:
        with PinnedMap(os.path.join(pins, "ports"), abi.U32, abi.PortCfg) as pm:
            for name, index in ports.items():
                cfg = abi.PortCfg()
                cfg.role = abi.ROLE_TRUSTED if name in trusted else abi.ROLE_UNTRUSTED
                cfg.mode = MODES[mode]
                pm.put(abi.U32(index), cfg)
        _tc_attach(namespace, ports, fn.fd, fn.name)
    finally:
        bpf.cleanup()   # the tc filters hold the program; the pins hold the maps
    return Attached(namespace, pins, ports, fresh)


def detach(namespace: str | None, purge: bool = False, bpf_root: str | None = None) -> int:
    """Remove our filter from every configured port; ``purge`` also unpins the maps.

    Without ``purge`` the bindings stay pinned, so attaching again loses nothing.
    Returns the number of filters removed.
    """
    pins = pin_dir(namespace, bpf_root)
    removed = 0
    try:
        with PinnedMap(os.path.join(pins, "ports"), abi.U32, abi.PortCfg) as pm:
            keys = list(pm.keys())
            if netns.exists(namespace) if namespace else True:
                removed = _tc_detach(namespace, [int(k.value) for k in keys])
            for k in keys:
                pm.delete(k)
    except MapNotPinned:
        pass
    if purge:
        unpin(pins)
    return removed


def unpin(pins: str) -> None:
    """Remove the pinned maps (the kernel frees them once no program uses them)."""
    for name in MAP_NAMES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pins, name))
    shutil.rmtree(pins, ignore_errors=True)
    parent = os.path.dirname(pins)
    with contextlib.suppress(OSError):
        os.rmdir(parent)   # the namespace's directory, once nothing else is pinned there
