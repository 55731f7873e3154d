"""The "migrating" message and the manager's pre-copy rules, without agents."""

from __future__ import annotations

import pytest

from xfer.errors import UsageError
from xfer.manager.precopy import conntrack_pairs
from xfer.net.message import parse


def _msg(**kw: object) -> dict[str, object]:
    return {"vm": "vm1", "indication": "migrating", "direction": "out", "source": "hv1",
            "destination": "hv2", **kw}


def test_migrating_goes_out_and_names_its_destination() -> None:
    assert parse(_msg()).indication == "migrating"
    with pytest.raises(UsageError, match="destination"):
        parse(_msg(destination=""))
    with pytest.raises(UsageError, match="out"):
        parse(_msg(direction="in"))


def test_conntrack_pairs_of_an_empty_plan() -> None:
    from xfer.manager.plan import Plan

    assert conntrack_pairs(Plan("hv1", "hv2")) == []
