"""The persister/sweeper loop against a fake table (no root, no BPF)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from xfer.dhcp.serve import Snooper


class FakeMap:
    def __init__(self) -> None:
        self.rows: list[tuple[object, object]] = []

    def items(self) -> list[tuple[object, object]]:
        return list(self.rows)


class FakeTable:
    def __init__(self) -> None:
        self.map = FakeMap()
        self.saved = 0
        self.expired = 0
        self.db_path = "fake.json"

    def sweep(self) -> int:
        n, self.expired = self.expired, 0
        return n

    def save(self, sync: bool = True) -> None:
        self.saved += 1


def _row(ip: int, expires: int) -> tuple[object, object]:
    key = SimpleNamespace(mac=bytes(6), ip=bytes([10, 0, 0, ip]))
    value = SimpleNamespace(expires_ns=expires, ifindex=3, vlan=0, flags=1)
    return key, value


def test_saves_once_per_change() -> None:
    table, s = FakeTable(), Snooper(None)
    assert s.tick(table)          # first round writes the file
    assert not s.tick(table)      # nothing changed
    table.map.rows.append(_row(2, 100))
    assert s.tick(table)          # a new binding
    table.map.rows[0] = _row(2, 200)
    assert s.tick(table)          # a renewal moved the expiry
    table.expired = 1
    s.tick(table)
    assert (table.saved, s.saves, s.swept) == (3, 3, 1)


def test_stop_ends_the_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    table = FakeTable()

    class Ctx:
        def __init__(self, *a: object, **k: object) -> None: ...
        def __enter__(self) -> FakeTable:
            return table
        def __exit__(self, *a: object) -> None: ...

    monkeypatch.setattr("xfer.dhcp.serve.BindingTable", Ctx)
    s = Snooper("ns", interval=0.01)

    async def main() -> None:
        task = asyncio.create_task(s.run(install_signals=False))
        await asyncio.sleep(0.05)
        table.map.rows.append(_row(3, 1))
        await asyncio.sleep(0.05)
        s.stop()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert table.saved == 2       # the empty table, then the new binding
