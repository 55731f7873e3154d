"""After a restart (or a takeover): finish or roll back what the previous run left under way.

- started (transfer under way), or rollback-pending: roll back the destinations (the
  source still has it all); journaled ``rollback-pending`` at once and done in the
  background, retried with backoff until every destination is reached: one
  unreachable device holds up neither the others nor the manager's listening, and
  a rollback that did not happen is never journaled as done;
- committed (cleanup pending): finish the cleanup, in the background too;
- stored (store mode between "out" and "in"): kept while its bundles last.

    for item in await recover(outcomes, store):
        print(item["migration"], item["action"])
"""

from __future__ import annotations

import asyncio
from typing import Any

from xfer.errors import XferError
from xfer.manager.journal import ROLLBACK_PENDING, Migration
from xfer.manager.outcome import Outcomes
from xfer.manager.plan import Plan
from xfer.manager.settings import Cleanup
from xfer.manager.store import Store
from xfer.model import VmIdentity

RESTARTED = "manager restarted"


async def recover(outcomes: Outcomes, store: Store) -> list[dict[str, Any]]:
    """What is being done with each unfinished migration of the journal. Run before serving: it
    returns once each migration's fate is journaled, its device work goes on in the background."""
    done = []
    journal = outcomes.journal
    await store.expire()
    for m in await journal.unfinished():
        if m.id in outcomes.pending:
            continue    # already being retried by this manager
        try:
            plan = outcomes.plan_of(m)
        except XferError as exc:
            await journal.finish(m.id, "failed", f"cannot recover: {exc}")
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
            outcomes.background(outcomes.cleanup(m.id, plan, ident))
            return "finishing cleanup"
        await outcomes.journal.finish(m.id, "committed")
        return "finished cleanup"
    if m.state == "stored" and await store.devices(m.id):
        return "kept stored bundles"
    await store.drop(m.id)
    # Pending until it happened: the journal never says rolled-back for a rollback that did not.
    await outcomes.journal.state(m.id, ROLLBACK_PENDING, RESTARTED)
    outcomes.retry_rollback(m.id, plan, ident, m.vm, "rolled-back", RESTARTED, 0.0)
    return "rolling back"


async def settle(outcomes: Outcomes) -> None:
    """Wait until no recovered rollback is pending (tests, a manager asked to stop cleanly)."""
    while outcomes.pending:
        await asyncio.gather(*(t for _, t in list(outcomes.pending.values())), return_exceptions=True)
