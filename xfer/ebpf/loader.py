"""Generic loader for xfer's bcc tc programs: compile, attach, detach, pin. Kernel-facing only.

A program is C source shipped as package data in ``xfer/ebpf`` (``*.bpf.c``,
sharing ``xfer_maps.h``), described by a ``TcProgram``. Its maps are declared
with ``BPF_TABLE_PINNED(..., XFER_PIN_DIR "/<map>")``: the loader defines
``XFER_PIN_DIR`` as ``/run/xfer/bpf/<netns-or-host>/<ifname>`` so each
interface gets its own maps, and they outlive detach, re-attach and restarts
of xfer (bcc reuses a map already pinned at that path).

API (every function takes ``netns=None`` for the current namespace)::

    prog = TcProgram("counters.bpf.c", {"ingress": "xfer_ctr_ingress",
                                        "egress": "xfer_ctr_egress"},
                     prio=0xc000, maps=("xfer_ctr", "xfer_ctr_base"))
    pins = attach(prog, "eth1", netns="fw-src")   # compile, pin maps, add clsact filters
    attach(prog, "eth1", netns="fw-src")          # again: replaces, still one filter per hook
    attached(prog, "eth1", netns="fw-src")        # -> ("ingress", "egress")
    detach(prog, "eth1", netns="fw-src")          # filters gone, pinned maps (counts) kept
    detach(prog, "eth1", netns="fw-src")          # nothing attached: fine, returns 0
    unpin(prog, "eth1", netns="fw-src")           # remove the pins (and empty dirs)

* Filters are added with ``replace`` at a fixed (prio, handle) per program, so
  attaching twice leaves one filter and programs of different ``prio`` share an
  interface (lower prio runs first). Programs should return TC_ACT_UNSPEC to let
  the next filter run. In use: DHCP snooping 0x0d5c, counters 0xc000.
* Failures raise ``BPFLoadError`` with a one-line reason (the first compiler error,
  the verifier's errno, the netlink error), ``NamespaceNotFound`` for a missing
  namespace.
* Needs root: CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) to load, CAP_NET_ADMIN to
  attach, CAP_SYS_ADMIN to mount bpffs and enter namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from xfer import netns as xnetns
from xfer.errors import BPFLoadError, NamespaceNotFound

PIN_ROOT = Path("/run/xfer/bpf")
HOST = "host"  # pin directory name for the current (unnamed) namespace
# clsact's pseudo-classes: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS).
_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
_HANDLE = 1
_IFNAME = re.compile(r"^[^/\s]{1,15}$")


@dataclass(frozen=True)
class TcProgram:
    """A tc program in package data.

    ``functions`` maps a direction ("ingress"/"egress") to the C function run there;
    ``prio`` is its tc filter priority, distinct per program sharing an interface;
    ``maps`` names the maps it pins under ``XFER_PIN_DIR`` (what ``unpin`` removes);
    leave it empty for a program that pins elsewhere: then no directory is made.
    """

    source: str
    functions: Mapping[str, str]
    prio: int
    maps: tuple[str, ...] = ()
    cflags: tuple[str, ...] = field(default=())


# --- package data ----------------------------------------------------------------------

@contextlib.contextmanager
def source_file(name: str) -> Iterator[Path]:
    """An absolute path to a program's source (bcc wants a real file).

    >>> with source_file("counters.bpf.c") as p: p.is_absolute()  # doctest: +SKIP
    True
    """
    ref = resources.files("xfer.ebpf").joinpath(name)
    if not ref.is_file():
        raise BPFLoadError(f"BPF source {name} is missing from the xfer.ebpf package")
    with resources.as_file(ref) as path:
        yield Path(path).resolve()


def source_text(prog: TcProgram) -> str:
    """The C source of ``prog`` (what ``--ebpf`` prints)."""
    with source_file(prog.source) as path:
        return path.read_text()


# --- pins ------------------------------------------------------------------------------

def pin_dir(ifname: str, netns: str | None = None, root: Path = PIN_ROOT) -> Path:
    """Where the maps of programs on ``ifname`` in ``netns`` are pinned.

    >>> pin_dir("eth1", "fw-src")
    PosixPath('/run/xfer/bpf/fw-src/eth1')
    """
    if not _IFNAME.match(ifname):
        raise BPFLoadError(f"not an interface name: {ifname!r}")
    ns = os.path.basename(netns.rstrip("/")) if netns else HOST
    return root / ns / ifname


def ensure_bpffs(root: Path = PIN_ROOT) -> None:
    """Mount a bpffs at ``root`` unless one is there (as scripts/setup does).

    NOTE: ``ip netns exec`` mounts a fresh /sys, hiding /sys/fs/bpf inside it, so
    xfer pins under /run, which every namespace of the host sees alike.
    """
    if _is_bpffs(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"bpf", os.fsencode(root), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BPFLoadError(f"cannot mount bpffs on {root}: {os.strerror(err)}")


def _is_bpffs(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(f[1] == target and f[2] == "bpf" for f in (ln.split() for ln in mounts))


def unpin(prog: TcProgram, ifname: str, netns: str | None = None,
          root: Path = PIN_ROOT) -> int:
    """Remove ``prog``'s pinned maps for ``ifname`` and the directories left empty.

    The counts in them are lost once no attached program holds the maps. Returns
    how many pins were removed.
    """
    where = pin_dir(ifname, netns, root)
    removed = 0
    for name in prog.maps:
        with contextlib.suppress(FileNotFoundError):
            (where / name).unlink()
            removed += 1
    for d in (where, where.parent):
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()  # only when empty: another program's pins stay
    return removed


# --- compile and attach ----------------------------------------------------------------

def attach(prog: TcProgram, ifname: str, netns: str | None = None, *,
           cflags: Sequence[str] = (), root: Path = PIN_ROOT) -> Path:
    """Compile ``prog``, pin its maps, attach it to clsact of ``ifname``; returns the pin dir.

    Idempotent: a second attach replaces the filters (one per hook) and reuses the pins.

    >>> attach(prog, "eth1", netns="fw-src")  # doctest: +SKIP
    PosixPath('/run/xfer/bpf/fw-src/eth1')
    """
    if netns and not xnetns.exists(netns):
        raise NamespaceNotFound(netns)
    with _ipr(netns) as ipr:
        _ifindex(ipr, ifname, netns)  # a typo must not leave pinned maps behind
    ensure_bpffs(root)
    pins = pin_dir(ifname, netns, root)
    if prog.maps:  # a program that pins elsewhere (its own -D path) leaves no empty dirs
        pins.mkdir(parents=True, exist_ok=True)
    bpf = _compile(prog, pins, cflags)
    try:
        fds = {d: _load(bpf, prog, fn) for d, fn in prog.functions.items()}
        with _ipr(netns) as ipr:
            index = _ifindex(ipr, ifname, netns)
            _ensure_clsact(ipr, index, ifname)
            for direction, fd in fds.items():
                _tc(ipr, "replace-filter", ifname, kind="bpf", index=index, handle=_HANDLE,
                    prio=prog.prio, parent=_PARENTS[direction], fd=fd,
                    name=prog.functions[direction], direct_action=True)
    finally:
        # tc holds its own reference to the programs, the pins hold the maps.
        bpf.cleanup()
    return pins


def detach(prog: TcProgram, ifname: str, netns: str | None = None) -> int:
    """Remove ``prog``'s filters from ``ifname``; the pinned maps stay. Returns filters removed.

    Nothing attached (or no clsact, or no such filter) is not an error.
    """
    removed = 0
    with _ipr(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        for direction in prog.functions:
            if direction not in _attached_directions(ipr, index, prog, (direction,)):
                continue
            _tc(ipr, "del-filter", ifname, kind="bpf", index=index, handle=_HANDLE,
                prio=prog.prio, parent=_PARENTS[direction])
            removed += 1
    return removed


def attached(prog: TcProgram, ifname: str, netns: str | None = None) -> tuple[str, ...]:
    """The directions in which ``prog``'s filter is attached to ``ifname``."""
    with _ipr(netns) as ipr:
        return _attached_directions(ipr, _ifindex(ipr, ifname, netns), prog, tuple(prog.functions))


def _attached_directions(ipr: Any, index: int, prog: TcProgram,
                         directions: Sequence[str]) -> tuple[str, ...]:
    found = []
    for direction in directions:
        try:
            filters = list(ipr.get_filters(index=index, parent=_PARENTS[direction]))
        except Exception:  # no clsact qdisc: nothing attached
            continue
        for f in filters:
            prio = (f["info"] >> 16) & 0xFFFF
            if prio == prog.prio and f.get_attr("TCA_KIND") == "bpf":
                found.append(direction)
                break
    return tuple(found)


def _compile(prog: TcProgram, pins: Path, cflags: Sequence[str]) -> Any:
    try:
        from bcc import BPF
    except ImportError:
        raise BPFLoadError("bcc is not importable: install Debian's python3-bpfcc and make the "
                           "venv with --system-site-packages") from None
    flags = [f'-DXFER_PIN_DIR="{pins}"', *prog.cflags, *cflags]
    with source_file(prog.source) as path:
        flags.append(f"-I{path.parent}")
        with _stderr_captured() as captured:
            try:
                return BPF(src_file=str(path).encode(), cflags=flags)
            except Exception as exc:
                reason = _first_error(captured()) or str(exc).splitlines()[0]
                raise BPFLoadError(f"compiling {prog.source} failed: {reason}") from None


def _load(bpf: Any, prog: TcProgram, function: str) -> int:
    from bcc import BPF

    try:
        return int(bpf.load_func(function.encode(), BPF.SCHED_CLS).fd)
    except Exception as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise BPFLoadError(f"loading {function} from {prog.source} failed: "
                           f"{lines[-1] if lines else exc}") from None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Any]:
    """Redirect fd 2 (clang writes diagnostics there, not to Python) into a temp file.

    Yields a function returning what was written so far; the text is echoed to the
    real stderr afterwards so nothing is hidden from the operator.
    """
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)

        def written() -> str:
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield written
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            text = written()
            if text.strip():
                os.write(2, text.encode())


def _first_error(output: str) -> str | None:
    for line in output.splitlines():
        if "error:" in line:
            return line.strip()
    return None


# --- netlink (pyroute2) ------------------------------------------------------------------

@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    if netns and not xnetns.exists(netns):
        raise NamespaceNotFound(netns)
    from pyroute2 import IPRoute

    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: Any, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise BPFLoadError(f"no interface {ifname!r} in {netns or 'this namespace'}")
    return int(found[0])


def _ensure_clsact(ipr: Any, index: int, ifname: str) -> None:
    try:
        ipr.tc("add", "clsact", index)
    except Exception as exc:
        if getattr(exc, "code", None) != errno.EEXIST:
            raise BPFLoadError(f"adding clsact to {ifname} failed: {exc}") from None


def _tc(ipr: Any, command: str, ifname: str, **kwargs: Any) -> None:
    try:
        ipr.tc(command, **kwargs)
    except Exception as exc:
        raise BPFLoadError(f"tc {command} on {ifname} failed: {exc}") from None
