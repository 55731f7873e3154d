"""How much state of each kind a device holds (``xfer agent status``).

Read-only counts from each kind's own layer: conntrack entries in the
namespace's table (nf_conntrack_count), (MAC, IP) rows the counters hold,
DHCP bindings in the snooper's table, filter rules in the ruleset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xfer.errors import XferError
from xfer.model import Kind


def count(kind: Kind, namespace: str | None) -> int:
    """Entries of ``kind`` on the device.

    >>> count(Kind.CONNTRACK, "xfer-fwsrc")   # doctest: +SKIP
    12
    """
    if kind is Kind.CONNTRACK:
        from xfer.conntrack.netlink import table_size

        return table_size(namespace)
    if kind is Kind.COUNTERS:
        from xfer.counters.transfer import show

        return len(show(None, namespace))
    if kind is Kind.RULES:
        from xfer.rules.transfer import count_rules

        return count_rules(namespace)
    from xfer.dhcp.store import BindingTable

    with BindingTable(namespace) as table:
        return len(table.bindings())


def counts(kinds: Sequence[Kind], namespace: str | None) -> dict[str, Any]:
    """``{"conntrack": 1234, ...}``; a kind that cannot answer says why instead of a number."""
    out: dict[str, Any] = {}
    for kind in kinds:
        try:
            out[kind.value] = count(kind, namespace)
        except XferError as exc:
            out[kind.value] = {"error": str(exc)}
        except ModuleNotFoundError as exc:
            out[kind.value] = {"error": f"{kind} is not available in this build of xfer ({exc.name})"}
    return out


def dhcp_counters(namespace: str | None) -> dict[str, dict[str, int]]:
    """The DHCP guard's per-port counters (``xfer dhcp counters``); {} while it is not attached.

    >>> dhcp_counters("xfer-sw")["vm0"]["drop_source"]   # doctest: +SKIP
    3
    """
    from xfer.dhcp.store import BindingTable

    try:
        with BindingTable(namespace) as table:
            return table.counters()
    except XferError:
        return {}
