"""After a restart: finish or roll back what the previous run left under way.

- started (transfer under way): roll back the destinations; the source still has it all;
- committed (cleanup pending): finish the cleanup;
- stored (store mode between "out" and "in"): kept while its bundles last.

    for item in await recover(outcomes, store):
        print(item["migration"], item["action"])
"""

from __future__ import annotations

from typing import Any

from xfer.errors import XferError
from xfer.manager.journal import Migration
from xfer.manager.outcome import Outcomes, all_destinations
from xfer.manager.plan import Plan
from xfer.manager.settings import Cleanup
from xfer.manager.store import Store
from xfer.model import VmIdentity


async def recover(outcomes: Outcomes, store: Store) -> list[dict[str, Any]]:
    """What was done with each unfinished migration of the journal. Run before serving."""
    done = []
    journal = outcomes.journal
    store.expire()
    for m in journal.unfinished():
        try:
            plan = outcomes.plan_of(m)
        except XferError as exc:
            journal.finish(m.id, "failed", f"cannot recover: {exc}")
            done.append({"migration": m.id, "vm": m.vm, "action": "failed", "error": str(exc)})
            continue
        with outcomes.naming(m.id):
            action = await _recover_one(outcomes, store, m, plan)
        done.append({"migration": m.id, "vm": m.vm, "was": m.state, "action": action})
    return done


async def _recover_one(outcomes: Outcomes, store: Store, m: Migration, plan: Plan) -> str:
    ident = VmIdentity.from_dict(m.vm_identity)
    if m.state == "committed":
        if outcomes.settings.cleanup == Cleanup.DELETE:
            await outcomes.cleanup(m.id, plan, ident)
        else:
            outcomes.journal.finish(m.id, "committed")
        return "finished cleanup"
    if m.state == "stored" and store.devices(m.id):
        return "kept stored bundles"
    errors = await outcomes.rollback(plan, ident, outcomes.stepper(m.id), all_destinations(plan))
    store.drop(m.id)
    outcomes.journal.finish(m.id, "rolled-back", "; ".join(["manager restarted", *errors]))
    return "rolled back"
