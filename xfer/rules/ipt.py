"""Kernel-facing: a namespace's iptables-legacy filter tables through python-iptables.

The only module that touches libiptc (Debian's ``python3-iptables``). Rules are
read and written as python-iptables' dictionaries (``iptc.easy``), checked by
``xfer.rules.iptrules``. A table is changed in one libiptc commit (the kernel
swaps the whole table), so a refused change leaves the table as it was.

    chains = read("fw-a")      # {(4, "filter", "FORWARD"): Chain(builtin=True, rules=[...])}
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import UsageError, XferError
from xfer.netns import entered
from xfer.rules.model import clip

TABLES = ("filter",)
ChainKey = tuple[int, str, str]     # (4 or 6, table, chain)


class IptError(XferError):
    """libiptc refused a change (its message, one line); ``committed``: families already changed."""

    def __init__(self, message: str, committed: Sequence[int] = ()) -> None:
        self.committed = tuple(committed)
        super().__init__(message)


@dataclass
class Chain:
    builtin: bool
    rules: list[dict[str, Any]] = field(default_factory=list)


def _iptc() -> Any:
    try:
        import iptc
    except ModuleNotFoundError:
        raise UsageError("iptables-legacy rules need Debian's python3-iptables; "
                         "scripts/setup installs it") from None
    return iptc


def legacy_tables(family: int) -> list[str]:
    """The legacy tables instantiated in the current namespace (none: the host does not use them).

    NOTE: opening a legacy table through libiptc instantiates it in the namespace
    (registering its hooks); reading this list first keeps a namespace that never
    used iptables-legacy untouched.
    """
    name = "ip_tables_names" if family == 4 else "ip6_tables_names"
    try:
        with open(f"/proc/thread-self/net/{name}") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _table(iptc: Any, family: int, name: str) -> Any:
    table = iptc.Table(name) if family == 4 else iptc.Table6(name)
    # NOTE: python-iptables keeps one Table object per name for the whole process;
    # refresh() re-reads it through a socket of the namespace we are in now.
    table.autocommit = False
    table.refresh()
    return table


def read(namespace: str | None = None) -> dict[ChainKey, Chain]:
    """Every chain of the namespace's legacy filter tables, rules as dictionaries, in order.

    >>> read("fw-a")[(4, "filter", "FORWARD")].rules[0]  # doctest: +SKIP
    {'dst': '10.0.1.2/32', 'protocol': 'tcp', 'tcp': {'dport': '5001'}, 'target': 'ACCEPT', ...}
    """
    out: dict[ChainKey, Chain] = {}
    with entered(namespace):
        present = {f: legacy_tables(f) for f in (4, 6)}
        if not any(t in TABLES for ts in present.values() for t in ts):
            return out
        iptc = _iptc()
        for family, names in present.items():
            for name in TABLES:
                if name not in names:
                    continue
                table = _table(iptc, family, name)
                for chain in table.chains:
                    rules = [iptc.easy.decode_iptc_rule(r, family == 6) for r in chain.rules]
                    for r in rules:
                        r["counters"] = list(r.get("counters", (0, 0)))
                    out[(family, name, chain.name)] = Chain(bool(chain.is_builtin()), rules)
    return out


def encode(rule: dict[str, Any], family: int) -> Any:
    """A python-iptables Rule for ``rule``, refused unless it reads back as exactly ``rule``.

    NOTE: python-iptables' encoder skips any field it cannot set without a word, which
    would make a rule broader than the one sent; reading the built rule back and
    comparing catches that (and any other way libxtables reads a value differently).
    """
    iptc = _iptc()
    want = {k: v for k, v in rule.items() if k != "counters"}
    built = iptc.easy.encode_iptc_rule(copy.deepcopy(want), family == 6)
    got = iptc.easy.decode_iptc_rule(built, family == 6)
    got.pop("counters", None)
    if got != want:
        raise IptError(f"rule {clip(want, 80)} does not read back the same through libxtables "
                       f"({clip(got, 80)}); refused")
    if "counters" in rule:
        built.counters = tuple(rule["counters"])
    return built


@contextmanager
def _tables(namespace: str | None, families: Sequence[int]) -> Iterator[dict[int, Any]]:
    with entered(namespace):
        iptc = _iptc()
        yield {f: _table(iptc, f, "filter") for f in families}


def apply(ops: Sequence[tuple[Any, ...]], namespace: str | None = None) -> None:
    """Run ``ops`` on the namespace's filter tables, one commit per table.

    Ops: ``("chain", family, table, name)`` creates a chain; ``("insert", family, table,
    chain, index, rule)`` inserts (index None appends); ``("delete", family, table, chain,
    rule)`` deletes the first equal rule; ``("drop", family, table, name)`` flushes and
    deletes a chain. Nothing is committed unless every op (and every rule's read-back
    check) succeeds.
    """
    if not ops:
        return
    iptc = _iptc()
    families = sorted({op[1] for op in ops})
    committed: list[int] = []
    with _tables(namespace, families) as tables:
        try:
            for op in ops:
                kind, family, _, name = op[:4]
                table = tables[family]
                if kind == "chain":
                    table.create_chain(name)
                elif kind == "insert":
                    # Built here, not earlier: a jump resolves only once its chain exists.
                    rule = encode(op[5], family)
                    chain = iptc.Chain(table, name)
                    if op[4] is None:
                        chain.append_rule(rule)
                    else:
                        chain.insert_rule(rule, op[4])
                elif kind == "delete":
                    chain = iptc.Chain(table, name)
                    want = {k: v for k, v in op[4].items() if k != "counters"}
                    for have in chain.rules:
                        got = iptc.easy.decode_iptc_rule(have, family == 6)
                        got.pop("counters", None)
                        if got == want:
                            chain.delete_rule(have)
                            break
                elif kind == "drop":
                    chain = iptc.Chain(table, name)
                    chain.flush()
                    table.delete_chain(name)
            for family in families:
                tables[family].commit()
                committed.append(family)
        except (iptc.IPTCError, IptError) as exc:
            for table in tables.values():
                table.refresh()   # drop the uncommitted changes
            if isinstance(exc, IptError):
                raise
            # NOTE: IPv4 and IPv6 are two tables, two commits: when the second fails the
            # first has taken effect; the caller takes it back (``committed``).
            raise IptError(f"iptables refused the change: {exc}", committed) from None
