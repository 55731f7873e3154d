"""The snooping database file: the binding table written to disk after each change.

Like a switch's DHCP-snooping database, the file survives what the pinned maps
do not (a reboot, a removed bpffs). Leases are stored as wall-clock expiry,
because CLOCK_BOOTTIME restarts at boot; on load they become remaining seconds
again and expired ones are dropped.

    >>> text = dumps([Binding("02:00:00:00:00:02", "10.0.0.2", 60.0, "v1")], now_wall=1000.0)
    >>> loads(text, now_wall=1010.0)[0].lease_remaining
    50.0
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xfer.dhcp.model import Binding
from xfer.errors import UsageError

FORMAT = "xfer-dhcpsnoop-db/1"
DEFAULT_DIR = Path("/var/lib/xfer/dhcpsnoop")


def default_path(namespace: str | None, state_dir: Path | None = None) -> Path:
    """``$XFER_DHCP_STATE_DIR`` (or /var/lib/xfer/dhcpsnoop) / ``<netns>.json``."""
    base = state_dir or Path(os.environ.get("XFER_DHCP_STATE_DIR", DEFAULT_DIR))
    name = os.path.basename(namespace) if namespace else "_host"
    return base / f"{name}.json"


def dumps(bindings: Iterable[Binding], now_wall: float) -> str:
    records: list[dict[str, Any]] = []
    for b in bindings:
        rec = b.to_json()
        del rec["lease_remaining"]
        left = b.lease_remaining
        rec["expires"] = None if left is None else round(now_wall + left, 3)
        records.append(rec)
    return json.dumps({"format": FORMAT, "saved": now_wall, "bindings": records}, indent=1)


def loads(text: str, now_wall: float) -> list[Binding]:
    """Bindings still valid at ``now_wall``; raises UsageError on a corrupted file."""
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise UsageError(f"snooping database format {data.get('format')!r} is not {FORMAT}")
        out = []
        for rec in data["bindings"]:
            expires = rec.get("expires")
            rec = {**rec, "lease_remaining": None if expires is None else float(expires) - now_wall}
            b = Binding.from_json(rec)
            if not b.expired:
                out.append(b)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"snooping database is corrupted: {exc}") from None


def save(path: Path, bindings: Iterable[Binding], now_wall: float, sync: bool = True) -> None:
    """Write atomically (temp file, rename): a crash leaves the old or the new file.

    ``sync`` also fsyncs, so the file survives a power loss; inside a migration's
    pause window callers skip that (milliseconds on some disks) and leave it to
    the next save.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(dumps(bindings, now_wall))
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, now_wall: float) -> list[Binding]:
    """The file's valid bindings; a missing file is an empty table."""
    try:
        return loads(path.read_text(), now_wall)
    except FileNotFoundError:
        return []
