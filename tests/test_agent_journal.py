"""The import journal: a marker while an import is under way, found again after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agent_fakes import VM
from xfer.agent.journal import Journal
from xfer.errors import XferError
from xfer.model import Kind


def test_marker_lives_exactly_as_long_as_the_import(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    assert journal.unfinished() == []
    with journal.importing("b1", VM, [Kind.CONNTRACK], "fw"):
        (item,) = journal.unfinished()
        assert (item.bundle_id, item.vm, item.kinds, item.netns) == ("b1", VM, (Kind.CONNTRACK,), "fw")
    assert journal.unfinished() == []
    with pytest.raises(RuntimeError), journal.importing("b2", VM, [Kind.CONNTRACK], None):
        raise RuntimeError("the kind module raised")
    assert journal.unfinished() == []


def test_a_crash_leaves_the_marker_oldest_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    first = journal.begin("b1", VM, [Kind.CONNTRACK], None)
    journal.begin("../../etc/x", VM, [Kind.DHCP], None)  # ids never escape the directory
    (tmp_path / "import-old.tmp").write_text("{")         # begin() died before its rename
    found = Journal(tmp_path).unfinished()
    assert [u.bundle_id for u in found] == ["b1", "../../etc/x"]
    assert all(u.path.parent == tmp_path for u in found)
    assert not list(tmp_path.glob("*.tmp"))
    journal.end(first)
    assert [u.bundle_id for u in journal.unfinished()] == ["../../etc/x"]


def test_an_unreadable_marker_is_not_guessed_at(tmp_path: Path) -> None:
    (tmp_path / "import-x.json").write_text(json.dumps({"bundle": "x"}))
    with pytest.raises(XferError, match="remove it by hand"):
        Journal(tmp_path).unfinished()
