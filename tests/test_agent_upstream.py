"""An agent's device-driven requests find the leader among several managers (issue 18)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xfer.agent.upstream import Upstream
from xfer.errors import AgentError

A, B, C = "https://10.0.4.9:8700", "https://10.0.4.10:8700", "https://10.0.4.11:8700"


class Managers:
    """B leads; A is a follower (421), C is down."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def request(self, method: str, url: str, path: str, **kw: Any) -> Any:
        self.asked.append(url)
        if url == A:
            raise AgentError(f"agent {url}: this manager is not the leader", 421, "NotLeader")
        if url == C:
            raise AgentError(f"agent {url} unreachable or hung up")
        return {"role": "source", "asked": url}


def test_requests_go_past_followers_and_dead_managers_to_the_leader() -> None:
    managers = Managers()
    up = Upstream(managers, f"{A},{C},{B}", "fw-a")  # type: ignore[arg-type]
    assert asyncio.run(up.role({"vm": "vm1"}))["asked"] == B
    assert managers.asked == [A, C, B]
    asyncio.run(up.report(7, {"error": "x"}))
    assert managers.asked[-1] == B and len(managers.asked) == 4, "the leader is asked first next time"


def test_a_refusal_by_the_leader_is_not_retried_elsewhere() -> None:
    class Refusing(Managers):
        async def request(self, method: str, url: str, path: str, **kw: Any) -> Any:
            self.asked.append(url)
            raise AgentError(f"agent {url}: not waiting", 409, "Conflict")

    managers = Refusing()
    with pytest.raises(AgentError, match="not waiting"):
        asyncio.run(Upstream(managers, f"{A},{B}", "fw-a").role({}))  # type: ignore[arg-type]
    assert managers.asked == [A]
