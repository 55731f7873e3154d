"""The counters program on a device: attach, detach, find and open its maps.

A device counts on each VM-facing interface it attached the program to; the
maps of each interface are pinned in ``/run/xfer/bpf/<netns-or-host>/<ifname>``.

    attach("eth1", "fw-src")
    with open_maps("fw-src") as maps:      # the one interface with counters
        print(maps.live.read_columns().table())
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from xfer.counters import model as counters
from xfer.counters.maps import MAP_NAMES, CounterMaps
from xfer.ebpf import loader
from xfer.ebpf.bpfsys import BpfMap
from xfer.errors import BPFLoadError, UsageError

# Priority 0xc000: after DHCP snooping / IP source guard (0x0d5c; a lower number
# runs first), so frames the guard drops are not counted as the VM's traffic.
PROGRAM = loader.TcProgram(
    source="counters.bpf.c",
    functions={"ingress": "xfer_ctr_ingress", "egress": "xfer_ctr_egress"},
    prio=0xC000,
    maps=MAP_NAMES,
)
LOCK_DIR = Path("/run/xfer/locks")
# Older builds kept carried counts in this hash (keyed and valued like xfer_ctr).
OLD_CARRIED = "xfer_ctr_base"


def attach(dev: str, netns: str | None = None, root: Path = loader.PIN_ROOT) -> Path:
    """Count on ``dev`` (the VM-facing interface); idempotent. Returns the pin directory.

    >>> attach("eth1", "fw-src")  # doctest: +SKIP
    PosixPath('/run/xfer/bpf/fw-src/eth1')
    """
    pins = loader.attach(PROGRAM, dev, netns, root=root)
    _adopt_old_carried(pins)
    return pins


def _adopt_old_carried(pins: Path) -> None:
    """Fold the carried counts an older build pinned as ``OLD_CARRIED`` into the table, once.

    Without this an upgraded device would keep the pin but no longer read it: its
    VMs' totals would drop by what imports had carried in. (A crash between the
    commit and the unlink would add them a second time at the next attach.)
    """
    old = pins / OLD_CARRIED
    if not old.exists():
        return
    with BpfMap.open_pinned(str(old)) as m, CounterMaps.open(pins) as maps, locked(maps):
        if (m.key_size, m.value_size) != (counters.KEY.size, counters.VALUE.size):
            raise BPFLoadError(f"{old} has key/value sizes {m.key_size}/{m.value_size}: "
                               "not carried counts this xfer can read; remove it")
        keys, values, _ = m.dump()
        state = maps.carried.state()
        total, _ = counters.merge(maps.carried.read(state), counters.Columns(keys, values))
        maps.carried.commit(maps.carried.stage(total, state))
    old.unlink()


def detach(dev: str, netns: str | None = None, unpin: bool = False,
           root: Path = loader.PIN_ROOT) -> int:
    """Stop counting on ``dev``. Counts stay pinned unless ``unpin`` (then they are gone).

    With ``unpin`` the pins and the import lock go even when the interface or
    its namespace is already gone (a torn-down lab).
    """
    try:
        return loader.detach(PROGRAM, dev, netns)
    finally:
        if unpin:
            (loader.pin_dir(dev, netns, root) / OLD_CARRIED).unlink(missing_ok=True)
            loader.unpin(PROGRAM, dev, netns, root)
            _lock_path(loader.pin_dir(dev, netns, root)).unlink(missing_ok=True)


def devices(netns: str | None = None, root: Path = loader.PIN_ROOT) -> list[str]:
    """Interfaces of ``netns`` that have counters pinned (attached now or before)."""
    base = loader.pin_dir("lo", netns, root).parent
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if (d / MAP_NAMES[0]).exists())


def open_maps(netns: str | None = None, dev: str | None = None,
              root: Path = loader.PIN_ROOT) -> CounterMaps:
    """The maps of ``dev``, or of the only interface with counters when ``dev`` is None."""
    if dev is None:
        found = _counting(netns, root)
        if len(found) > 1:
            raise UsageError(f"counters run on {', '.join(found)} in {_where(netns)}: "
                             "pick one with dev")
        dev = found[0]
    return CounterMaps.open(loader.pin_dir(dev, netns, root))


def open_all(netns: str | None = None, dev: str | None = None,
             root: Path = loader.PIN_ROOT) -> list[CounterMaps]:
    """The maps of ``dev``, or of every interface with counters in ``netns``."""
    if dev is not None:
        return [open_maps(netns, dev, root)]
    opened: list[CounterMaps] = []
    try:
        for name in _counting(netns, root):
            opened.append(CounterMaps.open(loader.pin_dir(name, netns, root)))
    except BaseException:
        for maps in opened:
            maps.close()
        raise
    return opened


def _counting(netns: str | None, root: Path) -> list[str]:
    found = devices(netns, root)
    if not found:
        # Only a device that holds a kind may export or import it.
        raise UsageError(f"no counters in {_where(netns)}: "
                         "run `xfer counters attach --dev IFACE` first")
    return found


def _where(netns: str | None) -> str:
    return f"namespace {netns}" if netns else "this namespace"


@contextlib.contextmanager
def locked(maps: CounterMaps, shared: bool = False) -> Iterator[None]:
    """Hold one interface's lock (bpffs holds no plain files, so it lives in LOCK_DIR).

    Imports and forgets hold it exclusively: one writer of the carried table at a
    time. Readers hold it ``shared``: a writer could otherwise rewrite the half
    they are reading (its second commit after they read the header).
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(maps.pins), "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def remove_locks(netns: str) -> None:
    """Remove the import locks of a namespace that is gone (they live outside bpffs)."""
    for lock in LOCK_DIR.glob(f"counters-{netns}-*.lock"):
        lock.unlink(missing_ok=True)


def _lock_path(pins: Path) -> Path:
    return LOCK_DIR / f"counters-{'-'.join(pins.parts[-2:])}.lock"
