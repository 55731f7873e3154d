"""A pre-copy delta as a bundle section: the entries that are new or changed, then the
destroyed ones, each part a stream of ctnetlink messages (the bundle's own form).

The encoding differs from a full section's (``ENCODING``), so an importer that does
not know deltas refuses one instead of creating the destroyed entries. A delta
from base ``""`` is a whole copy (bulk, or a resync after an expired cursor): the
destination then drops staged entries the copy does not hold.

>>> section = delta_section(changes, base="")          # doctest: +SKIP
>>> d = read_delta(section); len(d.upserts), d.cursor   # doctest: +SKIP
"""

from __future__ import annotations

from typing import NamedTuple

from xfer.bundle import Section
from xfer.conntrack import stream
from xfer.conntrack.index import Changes
from xfer.conntrack.stream import Stream
from xfer.conntrack.transfer import MAX_ENTRIES
from xfer.errors import BundleError
from xfer.model import Kind

ENCODING = "ctnetlink-delta/1"


class Delta(NamedTuple):
    upserts: Stream
    deletes: Stream
    base: str      # the cursor this delta starts from ("" : a whole copy)
    cursor: str    # the cursor it brings the destination to

    @property
    def whole(self) -> bool:
        return not self.base


def delta_section(changes: Changes, base: str) -> Section:
    """``changes`` (from ``base``) as a section."""
    meta = {"upserts": len(changes.upserts), "deletes": len(changes.deletes), "base": base,
            "cursor": changes.cursor}
    return Section(Kind.CONNTRACK, ENCODING, len(changes.upserts) + len(changes.deletes),
                   changes.upserts.payload + changes.deletes.payload, meta)


def is_delta(section: Section) -> bool:
    return section.encoding == ENCODING


def read_delta(section: Section) -> Delta:
    """The two parts of a delta section, each message checked to be one; BundleError
    otherwise. (Ownership is checked where the entries are staged.)"""
    if section.encoding != ENCODING:
        raise BundleError(f"conntrack section encoding {section.encoding!r} is not a delta")
    meta = section.meta
    ups, dels = meta.get("upserts"), meta.get("deletes")
    base, cursor = meta.get("base"), meta.get("cursor")
    if (not isinstance(ups, int) or not isinstance(dels, int) or ups < 0 or dels < 0
            or not isinstance(base, str) or not isinstance(cursor, str) or len(base) > 128
            or len(cursor) > 128):
        raise BundleError("conntrack delta section has a malformed header")
    if ups + dels != section.count or section.count > MAX_ENTRIES:
        raise BundleError(f"conntrack delta section counts disagree ({ups} + {dels} != "
                          f"{section.count}) or exceed {MAX_ENTRIES}")
    try:
        offsets = stream.scan(section.payload)
    except ValueError as exc:
        raise BundleError(f"conntrack delta section is {exc}") from None
    if len(offsets) != section.count:
        raise BundleError(f"conntrack delta section holds {len(offsets)} entries, header says "
                          f"{section.count}")
    payload = section.payload
    cut = offsets[ups] if ups < len(offsets) else len(payload)
    return Delta(Stream(payload[:cut], offsets[:ups]),
                 Stream(payload[cut:], [o - cut for o in offsets[ups:]]), base, cursor)
