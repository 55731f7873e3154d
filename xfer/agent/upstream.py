"""An agent's requests to the manager in the device-driven variant (mutual TLS, its own certificate).

The manager lets a device act only for itself: these paths name the device, and
the manager checks that the client certificate does too.

    up = Upstream(client, "https://10.0.4.9:8700", "fw-src")
    part = await up.role(message)                  # {"role": "source", "migration": 7, ...}
    await up.deposit(7, bundle_bytes)

Several managers sharing an etcd journal: ``url`` lists them, comma-separated. A
manager that is not the leader answers 421 (nothing done) and an unreachable one
answers nothing: the request goes to the next, and the one that answered is asked
first next time. A request repeated at a new leader does no harm: it knows no
round of the old leader's and refuses it (409).
"""

from __future__ import annotations

from typing import Any

from xfer.agent.client import AgentClient
from xfer.errors import AgentError


class Upstream:
    """The manager's device endpoints, for device ``device``."""

    def __init__(self, client: AgentClient, url: str, device: str) -> None:
        self.client, self.device = client, device
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        self.url = self.urls[0]
        self._base = f"/devices/{device}"

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        """``client.request`` to the leader: past followers (421) and unreachable managers."""
        last: AgentError | None = None
        for url in [self.url, *(u for u in self.urls if u != self.url)]:
            try:
                answer = await self.client.request(method, url, path, **kw)
            except AgentError as exc:
                if len(self.urls) == 1 or exc.status not in (0, 421):
                    raise
                last = exc
                continue
            self.url = url
            return answer
        assert last is not None
        raise last

    async def role(self, message: dict[str, Any]) -> dict[str, Any]:
        """This device's part in the migration ``message`` announced (as heard)."""
        answer: dict[str, Any] = await self._request("POST", f"{self._base}/role", json_body=message)
        return answer

    async def deposit(self, migration: int, data: bytes) -> dict[str, Any]:
        """Put this source device's bundle in the manager's store."""
        answer: dict[str, Any] = await self._request(
            "PUT", f"{self._base}/deposits/{migration}", data=data)
        return answer

    async def collect(self, migration: int, source: str) -> bytes:
        """The bundle ``source`` deposited, for this destination device."""
        data: bytes = await self._request("GET", f"{self._base}/collect/{migration}/{source}",
                                          want_bytes=True)
        return data

    async def report(self, migration: int, body: dict[str, Any]) -> dict[str, Any]:
        """A destination's import report (``{"source", "report"}``) or a failure (``{"error"}``)."""
        answer: dict[str, Any] = await self._request(
            "POST", f"{self._base}/reports/{migration}", json_body=body)
        return answer
