"""The import journal: a marker file per import under way.

The kernel applies a conntrack import in batches as it reads them, so an agent
killed in the middle of one leaves part of a VM's entries behind — state that
half-opens the firewall and that nobody asked for. Before touching the kernel
the agent writes a marker (fsynced, atomically renamed) naming the VM, kinds and
namespace; it removes the marker once the import has returned (committed or
rolled back by the kind module). A marker found at start-up is an import that
died mid-way: the agent rolls it back before it serves anything.

    with journal.importing(bundle_id, vm, kinds, netns):
        transfer.import_bundle(...)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xfer.errors import XferError
from xfer.model import Kind, VmIdentity

_PREFIX = "import-"


@dataclass(frozen=True)
class Unfinished:
    """An import that started and never finished (its marker survived)."""

    path: Path
    bundle_id: str
    vm: VmIdentity
    kinds: tuple[Kind, ...]
    netns: str | None
    started: float


class Journal:
    """Import markers in ``directory`` (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, bundle_id: str) -> Path:
        safe = "".join(ch for ch in bundle_id if ch.isalnum())[:64] or "bundle"
        return self.directory / f"{_PREFIX}{safe}.json"

    def begin(self, bundle_id: str, vm: VmIdentity, kinds: Sequence[Kind], netns: str | None) -> Path:
        """Write the marker durably; the kernel may be touched once this returns."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(bundle_id)
        record = {"bundle": bundle_id, "vm": vm.to_dict(), "kinds": [k.value for k in kinds],
                  "netns": netns, "started": time.time(), "pid": os.getpid()}
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        return path

    def end(self, path: Path) -> None:
        """The import returned (committed or rolled back): drop its marker."""
        path.unlink(missing_ok=True)

    @contextmanager
    def importing(self, bundle_id: str, vm: VmIdentity, kinds: Sequence[Kind],
                  netns: str | None) -> Iterator[None]:
        """Hold a marker for the block. An exception also ends it: the kind modules
        roll back their own failures, and the caller undoes what it committed."""
        path = self.begin(bundle_id, vm, kinds, netns)
        try:
            yield
        finally:
            self.end(path)

    def unfinished(self) -> list[Unfinished]:
        """Markers left by a process that died during an import, oldest first."""
        if not self.directory.is_dir():
            return []
        for tmp in self.directory.glob(f"{_PREFIX}*.tmp"):
            # begin() died before its rename: the kernel was never touched for it.
            tmp.unlink(missing_ok=True)
        out = []
        for path in sorted(self.directory.glob(f"{_PREFIX}*.json")):
            try:
                rec = json.loads(path.read_text())
                out.append(Unfinished(path, str(rec["bundle"]), VmIdentity.from_dict(rec["vm"]),
                                      tuple(Kind(k) for k in rec["kinds"]), rec.get("netns"),
                                      float(rec.get("started", 0))))
            except (OSError, ValueError, KeyError, TypeError, XferError) as exc:
                raise XferError(f"import journal {path} is unreadable ({exc}); "
                                "check the device and remove it by hand") from None
        return sorted(out, key=lambda u: u.started)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
