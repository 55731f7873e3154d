"""One message being acted on: what it asks for (``Work``), who does it (``Driver``), its task.

Copies of a message (``xfer.net.message.dedupe_key``) join the entry of the first.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xfer.manager.rounds import Round
from xfer.net.message import Message


class Work(StrEnum):
    """What a message asks the manager to do."""

    MOVE = "move"         # "out" outside store mode: source to destination now
    DEPOSIT = "deposit"   # "out" in store mode, or without destination: into the store
    COLLECT = "collect"   # "in": from the store to the destination


class Driver(StrEnum):
    """Who does the device work of a message."""

    MANAGER = "manager"   # the manager calls the agents (HTTP or unicast UDP message)
    DEVICES = "devices"   # the agents act themselves (heard on the multicast group)


@dataclass(eq=False)
class Entry:
    """One message being acted on (or lately acted on); copies of the message join it."""

    msg: Message
    work: Work
    driver: Driver
    started: float                  # perf_counter when the message came: the report's ms count from it
    prior: Entry | None = None      # the deposit under way that this collect waits for
    # A collect outside store mode: nothing stored means the move happened on "out" (no error).
    optional: bool = False
    task: asyncio.Task[dict[str, Any]] | None = None
    round: Round | None = None      # device-driven: the reports awaited
    # Set once devices can be told their part (at once for work the manager drives).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    key: str = ""
    memory_s: float = 0.0
    forget_at: float = math.inf     # monotonic; after it a copy counts as a new message
    devices: list[str] = field(default_factory=list)  # a move's devices (admission control)
