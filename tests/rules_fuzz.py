"""Structure-aware mutations of a rules section, for the fuzz tests (tests/ and netns_tests/).

A mutation starts from a real export and changes one place in its JSON tree:
a value replaced by one an attacker would try (another host, a prefix, a
catch-all, a jump out of the bundle, an unknown statement, a wrong type), a key
or item removed, or one added.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

from xfer.bundle import Section
from xfer.model import Kind
from xfer.rules.model import ENCODING

HOSTILE: list[Any] = [
    "10.0.1.3", "10.0.1.2", "fd00:1::3", "02:00:00:00:01:03", "0.0.0.0", "10.0.1.2/24", "::",
    {"prefix": {"addr": "10.0.0.0", "len": 8}}, {"prefix": {"addr": "10.0.1.2", "len": 32}},
    {"set": ["10.0.1.2", "10.0.1.3"]}, {"set": []}, {"range": ["10.0.1.0", "10.0.1.255"]},
    "@trusted", "@nope", "$var", "", "x" * 300, "forward", "vmc", "inbound", "filter", "nat",
    "inet", "ip", "ip6", "netdev", "FORWARD", "ACCEPT", "SNAT", "!10.0.1.2/32", "10.0.1.2/32",
    -1, 0, 4, 6, 2**70, True, False, None, 1.5, [], {}, [[[[]]]],
    {"accept": None}, {"drop": None}, {"return": None}, {"counter": None},
    {"jump": {"target": "forward"}}, {"goto": {"target": "vmc"}}, {"jump": {"target": "elsewhere"}},
    {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@m"}},
    {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}, {"snat": {"addr": "10.0.8.1"}},
    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.0.1.3"}},
    {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.0.1.2"}},
    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vm0"}},
    {"type": "filter", "hook": "forward", "prio": -300}, {"type": "nat", "hook": "prerouting", "prio": 0},
    {"MARK": {"set-xmark": "0x1/0xffffffff"}}, {"goto": "inbound"},
    {"family": "inet", "table": "xfer", "name": "inbound", "vm": True},
    {"family": 4, "table": "filter", "name": "INPUT", "vm": True},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.text(max_size=12)
    | st.sampled_from(HOSTILE),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn, part: Any, max_edits: int = 3) -> Any:
    """``part`` with one to ``max_edits`` structure-aware changes."""
    tree = copy.deepcopy(part)
    for _ in range(draw(st.integers(1, max_edits))):
        tree = _edit(draw, tree)
    return tree


def _edit(draw: st.DrawFn, tree: Any) -> Any:
    # Walk down a random path; stop anywhere, then change that node in its parent.
    parent: Any = None
    key: Any = None
    node = tree
    while isinstance(node, dict | list) and node and draw(st.integers(0, 9)) > 0:   # mostly deep
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
    op = draw(st.sampled_from(["replace", "replace", "delete", "insert", "duplicate"]))
    value = copy.deepcopy(draw(json_values))   # never mutate the shared HOSTILE values
    if parent is None:
        if op == "insert" and isinstance(tree, dict):
            tree[draw(st.sampled_from(["nft", "iptables", "pf", "rules"]))] = value
            return tree
        return value if op == "replace" else tree
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif isinstance(node, list):
        node.insert(draw(st.integers(0, len(node))), value)
    elif isinstance(node, dict):
        node[draw(st.sampled_from(["extra", "base", "vm", "comment", "handle", "expr", "elem"]))] = value
    else:
        parent[key] = value
    return tree


def section_of(parts: Any) -> Section:
    """A section for ``parts`` whose count agrees with them where that can be computed."""
    count = 0
    try:
        for part in parts.values():
            count += len(part["rules"])
            count += sum(len(s["elem"]) for s in part.get("elements", []))
    except (AttributeError, KeyError, TypeError):
        count = 1
    return Section(Kind.RULES, ENCODING, count, json.dumps(parts).encode())
