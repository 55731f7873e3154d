"""Kernel-facing: a namespace's nftables ruleset through libnftables' JSON interface.

The only module that talks to libnftables (Debian's ``python3-nftables``). Every
call enters the namespace for its whole duration: libnftables opens its netlink
socket per command, in the namespace of the calling thread.

    with entered("fw-a"):
        objs = list_ruleset()
    apply([{"add": {"table": {"family": "inet", "name": "t"}}}], "fw-a")
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from xfer.errors import KernelError, UsageError, XferError
from xfer.netns import entered


class NftError(XferError):
    """libnftables refused a command (its message, one line)."""


def _context() -> Any:
    try:
        import nftables
    except ModuleNotFoundError:
        raise UsageError("nftables rules need Debian's python3-nftables (libnftables' Python "
                         "binding); scripts/setup installs it") from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


def list_ruleset(namespace: str | None = None,
                 tables: Iterable[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """The ruleset as libnftables' JSON objects (``{"table": {...}}``, ``{"rule": {...}}``...).

    With ``tables`` ((family, name) pairs), only those tables that exist: listing costs
    per rule listed (~0.07 ms here), and an import needs only the tables it touches.

    >>> list_ruleset("fw-a")[1]  # doctest: +SKIP
    {'table': {'family': 'inet', 'name': 'xfer', 'handle': 1}}
    """
    with entered(namespace):
        nft = _context()
        if tables is None:
            return _objs(nft, "list ruleset")
        wanted = set(tables)
        present = [(o["table"]["family"], o["table"]["name"]) for o in _objs(nft, "list tables")]
        out: list[dict[str, Any]] = []
        for family, name in present:
            if (family, name) in wanted:
                out += _objs(nft, f"list table {family} {name}")
        return out


def _objs(nft: Any, command: str) -> list[dict[str, Any]]:
    rc, out, err = nft.cmd(command)
    if rc != 0:
        raise KernelError(1, f"nft {command}: {err.strip()}")
    if not out.strip():
        return []
    objs: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    return [o for o in objs if "metainfo" not in o]


def apply(commands: list[dict[str, Any]], namespace: str | None = None) -> None:
    """Run ``commands`` as one nftables transaction: all of them take effect or none.

    >>> apply([{"add": {"table": {"family": "inet", "name": "t"}}}], "fw-b")  # doctest: +SKIP
    """
    if not commands:
        return
    with entered(namespace):
        nft = _context()
        rc, _, err = nft.json_cmd({"nftables": commands})
    if rc != 0:
        first = next((line for line in err.splitlines() if line.strip()), "refused")
        raise NftError(f"nftables refused the change: {first.strip()}")
