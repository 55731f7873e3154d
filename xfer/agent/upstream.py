"""An agent's requests to the manager in the device-driven variant (mutual TLS, its own certificate).

The manager lets a device act only for itself: these paths name the device, and
the manager checks that the client certificate does too.

    up = Upstream(client, "https://10.0.4.9:8700", "fw-src")
    part = await up.role(message)                  # {"role": "source", "migration": 7, ...}
    await up.deposit(7, bundle_bytes)
"""

from __future__ import annotations

from typing import Any

from xfer.agent.client import AgentClient


class Upstream:
    """The manager's device endpoints, for device ``device``."""

    def __init__(self, client: AgentClient, url: str, device: str) -> None:
        self.client, self.url, self.device = client, url, device
        self._base = f"/devices/{device}"

    async def role(self, message: dict[str, Any]) -> dict[str, Any]:
        """This device's part in the migration ``message`` announced (as heard)."""
        answer: dict[str, Any] = await self.client.request("POST", self.url, f"{self._base}/role",
                                                           json_body=message)
        return answer

    async def deposit(self, migration: int, data: bytes) -> dict[str, Any]:
        """Put this source device's bundle in the manager's store."""
        answer: dict[str, Any] = await self.client.request(
            "PUT", self.url, f"{self._base}/deposits/{migration}", data=data)
        return answer

    async def collect(self, migration: int, source: str) -> bytes:
        """The bundle ``source`` deposited, for this destination device."""
        data: bytes = await self.client.request("GET", self.url, f"{self._base}/collect/{migration}/{source}",
                                                want_bytes=True)
        return data

    async def report(self, migration: int, body: dict[str, Any]) -> dict[str, Any]:
        """A destination's import report (``{"source", "report"}``) or a failure (``{"error"}``)."""
        answer: dict[str, Any] = await self.client.request(
            "POST", self.url, f"{self._base}/reports/{migration}", json_body=body)
        return answer
