"""Fuzzing the strict check of rules sections: any mutation is refused with an XferError or
is still only the VM's; nothing else escapes (no KeyError, TypeError, RecursionError...)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rules_fuzz import mutated, section_of
from tests.test_rules import IPT, SOURCE, VM
from xfer.errors import XferError
from xfer.rules import iptrules, nftrules
from xfer.rules.transfer import section_parts

PARTS: dict[str, Any] = json.loads(json.dumps({"nft": nftrules.export_part(SOURCE, VM)[0],
                                               "iptables": iptrules.export_part(IPT, VM)[0]}))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_section_is_refused_or_still_only_the_vms(data: st.DataObject) -> None:
    parts = data.draw(mutated(PARTS))
    try:
        checked = section_parts(section_of(parts), VM)
    except XferError as exc:
        assert "\n" not in str(exc)
        return
    # Accepted: every rule outside the VM's own chains is anchored to one of its addresses.
    for backend, part in checked.items():
        own = {(c["family"], c["table"], c["name"]) for c in part["chains"] if c["vm"]}
        for r in part["rules"]:
            if (r["family"], r["table"], r["chain"]) in own:
                continue
            if backend == "nft":
                assert nftrules.check_rule(r["expr"], VM).anchored
            else:
                assert iptrules.check_rule(r["rule"], r["family"], VM).anchored
