"""How much state of each kind a device holds (``xfer agent status``).

Read-only counts from the kind's own layer: the conntrack table size
(nf_conntrack_count of the namespace); other kinds answer through their kind
module's ``device_count(namespace)`` when it has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xfer.errors import XferError
from xfer.model import Kind
from xfer.transfer import kind_module


def count(kind: Kind, namespace: str | None) -> int | None:
    """Entries of ``kind`` on the device, or None when the kind cannot say."""
    if kind is Kind.CONNTRACK:
        from xfer.conntrack.netlink import table_size

        return table_size(namespace)
    counter = getattr(kind_module(kind), "device_count", None)
    return int(counter(namespace)) if counter is not None else None


def counts(kinds: Sequence[Kind], namespace: str | None) -> dict[str, Any]:
    """``{"conntrack": 1234, ...}``; a kind that fails says why instead of a number.

    >>> counts([Kind.CONNTRACK], "xfer-fwsrc")   # doctest: +SKIP
    {'conntrack': 12}
    """
    out: dict[str, Any] = {}
    for kind in kinds:
        try:
            out[kind.value] = count(kind, namespace)
        except XferError as exc:
            out[kind.value] = {"error": str(exc)}
    return out
