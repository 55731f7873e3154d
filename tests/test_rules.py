"""The rules kind without a kernel: which rules are the VM's, the strict check, placement."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from xfer.bundle import Bundle, Section
from xfer.errors import BundleError, ForeignEntryError
from xfer.model import Kind, parse_vm
from xfer.rules import iptrules, nftrules
from xfer.rules.ipt import Chain
from xfer.rules.model import ENCODING, MAX_DEPTH, load_strict, place
from xfer.rules.transfer import section_parts
from xfer.transfer import import_order

VM = parse_vm("10.0.1.2,fd00:1::2,02:00:00:00:01:02", {})


def daddr(addr: Any, proto: str = "ip") -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "daddr"}},
                      "right": addr}}


def dport(port: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}}


ACCEPT: dict[str, Any] = {"accept": None}
ESTABLISHED = [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
               ACCEPT]


def listing(rules: dict[str, list[list[dict[str, Any]]]], base: tuple[str, ...] = ("forward",),
            sets: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A ``nft -j list ruleset`` of table inet t with these chains (rules as expression lists)."""
    objs: list[dict[str, Any]] = [{"table": {"family": "inet", "name": "t", "handle": 1}}]
    for s in sets or []:
        objs.append({"set": {"family": "inet", "table": "t", "handle": 9, **s}})
    handle = 10
    for name in rules:
        chain: dict[str, Any] = {"family": "inet", "table": "t", "name": name, "handle": handle}
        if name in base:
            chain.update(type="filter", hook="forward", prio=0, policy="drop")
        objs.append({"chain": chain})
        handle += 1
    for name, exprs in rules.items():
        for expr in exprs:
            objs.append({"rule": {"family": "inet", "table": "t", "chain": name, "handle": handle,
                                  "expr": copy.deepcopy(expr)}})
            handle += 1
    return objs


SOURCE = listing({
    "forward": [
        ESTABLISHED,
        [daddr("10.0.1.2"), dport(5001), ACCEPT],                              # the VM's
        [daddr({"set": ["10.0.1.2", "10.0.1.9"]}), {"drop": None}],            # VM and another host
        [daddr({"prefix": {"addr": "10.0.1.0", "len": 24}}), {"drop": None}],  # a whole prefix
        [daddr("fd00:1::2", "ip6"), {"jump": {"target": "vmc"}}],              # the VM's, to its chain
        [daddr("10.0.1.2"), {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}],  # unsupported
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": "@trusted"}}, ACCEPT],                            # shared, VM element
        [daddr("10.0.1.2"), {"jump": {"target": "shared"}}],                   # jumps to a shared chain
        [daddr("10.0.7.7"), {"jump": {"target": "shared"}}],
        [{"drop": None}],
    ],
    "vmc": [[dport(22), ACCEPT], [{"return": None}]],
    "shared": [[ACCEPT]],
}, sets=[{"name": "trusted", "type": "ipv4_addr", "elem": ["10.0.1.2", "10.0.1.3"]}])


def test_export_takes_the_vms_rules_chains_and_elements_and_says_what_it_left() -> None:
    part, left_out, doomed = nftrules.export_part(SOURCE, VM)
    exprs = [(r["chain"], r["expr"]) for r in part["rules"]]
    assert exprs == [("forward", [daddr("10.0.1.2"), dport(5001), ACCEPT]),
                     ("forward", [daddr("fd00:1::2", "ip6"), {"jump": {"target": "vmc"}}]),
                     ("vmc", [dport(22), ACCEPT]), ("vmc", [{"return": None}])]
    assert [(c["name"], c["vm"]) for c in part["chains"]] == [("forward", False), ("vmc", True)]
    assert part["elements"] == [{"family": "inet", "table": "t", "name": "trusted", "type": "ipv4_addr",
                                 "elem": ["10.0.1.2"]}]
    assert left_out == {"matches the VM and other hosts in one set": 1,
                        "matches a whole prefix holding the VM": 1,
                        "jumps to a chain other rules jump to as well": 1,
                        "unsupported: statement 'mangle'": 1}
    # placement context: the nearest rules around each one that are not the VM's
    assert part["rules"][0]["after"] == {"expr": ESTABLISHED}
    # forget deletes the two rules, then the chain (flushed first), then the element
    kinds = [next(iter(c)) + ":" + next(iter(next(iter(c.values())))) for c in doomed]
    assert kinds == ["delete:rule", "delete:rule", "flush:chain", "delete:chain", "delete:element"]


def test_a_good_part_passes_the_check_and_imports_nothing_twice() -> None:
    part, _, _ = nftrules.export_part(SOURCE, VM)
    checked = nftrules.check_part(json.loads(json.dumps(part)), VM)
    dest = listing({"forward": [ESTABLISHED, [daddr("10.0.7.7"), ACCEPT], [{"drop": None}]]})
    plan = nftrules.import_plan(checked, dest, VM)
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in plan.commands]
    assert ("add", "chain") in verbs and ("add", "set") in verbs and ("add", "element") in verbs
    inserts = [c["insert"]["rule"] for c in plan.commands if "insert" in c]
    # after its source neighbour (established), so above the destination's next rule (handle 12)
    assert inserts[0]["expr"][1] == dport(5001) and inserts[0]["handle"] == 12
    # the destination now as the plan leaves it: a second plan has nothing to do
    after = listing({"forward": [ESTABLISHED, [daddr("10.0.1.2"), dport(5001), ACCEPT],
                                 [daddr("10.0.7.7"), ACCEPT], [{"drop": None}],
                                 [daddr("fd00:1::2", "ip6"), {"jump": {"target": "vmc"}}]],
                     "vmc": [[dport(22), ACCEPT], [{"return": None}]]},
                    sets=[{"name": "trusted", "type": "ipv4_addr", "elem": ["10.0.1.2"]}])
    again = nftrules.import_plan(checked, after, VM)
    assert again.commands == [] and again.created == 0 and again.skipped == 5


def _part() -> dict[str, Any]:
    return json.loads(json.dumps(nftrules.export_part(SOURCE, VM)[0]))


def _forged(edit: Any) -> dict[str, Any]:
    part = _part()
    edit(part)
    return part


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["rules"][0]["expr"].__setitem__(0, daddr("10.0.1.3")), "matches none of VM"),
    (lambda p: p["rules"][0]["expr"].pop(0), "matches none of VM"),                       # catch-all
    (lambda p: p["rules"][0]["expr"].__setitem__(0, daddr({"prefix": {"addr": "10.0.1.0", "len": 24}})),
     "matches none of VM"),
    (lambda p: p["rules"][0]["expr"].__setitem__(0, daddr({"set": ["10.0.1.2", "10.0.1.3"]})),
     "matches none of VM"),
    (lambda p: p["rules"][0]["expr"][0]["match"].__setitem__("op", "!="), "matches none of VM"),
    (lambda p: p["rules"][0]["expr"].insert(1, {"vmap": {"key": 1, "data": "@m"}}), "statement 'vmap'"),
    (lambda p: p["rules"][0]["expr"].__setitem__(2, {"jump": {"target": "forward"}}),
     "not a chain of the VM"),
    (lambda p: p["rules"][0]["expr"].__setitem__(2, {"goto": {"target": "elsewhere"}}),
     "not a chain of the VM"),
    (lambda p: p["rules"][0]["expr"].insert(1, {"match": {"op": "==", "left": {"payload": {
        "base": "nh", "offset": 0, "len": 8}}, "right": 1}}), "raw payload"),
    (lambda p: p["elements"][0]["elem"].append("10.0.1.3"), "carries none of VM"),
    (lambda p: p["elements"][0]["elem"].append({"prefix": {"addr": "10.0.0.0", "len": 8}}), "carries none"),
    (lambda p: p["chains"][1].update(base={"type": "filter", "hook": "forward", "prio": 0}), "base chain"),
    (lambda p: p["chains"][0].update(base={"type": "nat", "hook": "forward", "prio": 0}), "filter chains"),
    (lambda p: p["rules"][0]["expr"][0]["match"].update(right="10.0.1.02"), "matches none of VM"),
    (lambda p: p["rules"][0].update(extra=1), "unexpected extra"),
    (lambda p: p["rules"][0].update(chain="other"), "does not name"),
])
def test_a_forged_part_is_refused_whole(edit: Any, message: str) -> None:
    with pytest.raises((ForeignEntryError, BundleError), match=message):
        nftrules.check_part(_forged(edit), VM)


def test_a_chain_of_the_vms_that_exists_with_other_rules_is_refused() -> None:
    checked = nftrules.check_part(_part(), VM)
    dest = listing({"forward": [ESTABLISHED], "vmc": [[ACCEPT]]})
    with pytest.raises(ForeignEntryError, match="exists on this device with other rules"):
        nftrules.import_plan(checked, dest, VM)


@pytest.mark.parametrize("raw, message", [
    (b'{"nft": 1, "nft": 2}', "repeats key"),
    (b'{"a": NaN}', "not JSON"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nests deeper"),
    (b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', None),
    (b"\xff", "not UTF-8"),
    (b'{"a": ', "corrupted"),
])
def test_strict_json(raw: bytes, message: str | None) -> None:
    if message is None:
        assert load_strict(raw) == json.loads(raw)     # brackets inside strings do not count
        return
    with pytest.raises(BundleError, match=message):
        load_strict(raw)


def test_section_count_must_agree_and_unknown_backends_are_refused() -> None:
    payload = json.dumps({"nft": _part()}).encode()
    ok = Section(Kind.RULES, ENCODING, 5, payload)
    assert set(section_parts(ok, VM)) == {"nft"}
    with pytest.raises(BundleError, match="header says"):
        section_parts(Section(Kind.RULES, ENCODING, 4, payload), VM)
    with pytest.raises(BundleError, match="unexpected pf"):
        section_parts(Section(Kind.RULES, ENCODING, 0, b'{"pf": {}}'), VM)


@pytest.mark.parametrize("existing, incoming, expected", [
    (["a", "z"], [("v", "a", "z")], [(False, 1)]),                 # after its source neighbour
    (["z"], [("v", "a", "z")], [(False, 0)]),                      # else before the one after it
    (["q"], [("v", "a", "z")], [(False, 1)]),                      # else at the end
    (["a", "v", "z"], [("v", "a", "z"), ("w", "a", "z")], [(True, 1), (False, 2)]),  # follows its run
    (["a", "z"], [("v", "a", "z"), ("w", "a", "z")], [(False, 1), (False, 1)]),     # order kept
])
def test_place(existing: list[str], incoming: list[tuple[str, str, str]],
               expected: list[tuple[bool, int]]) -> None:
    assert [(p.exists, p.position) for p in place(existing, incoming)] == expected


IPT = {
    (4, "filter", "FORWARD"): Chain(True, [
        {"protocol": "tcp", "conntrack": {"ctstate": "ESTABLISHED,RELATED"}, "target": "ACCEPT",
         "counters": [0, 0]},
        {"dst": "10.0.1.2/32", "protocol": "tcp", "tcp": {"dport": "5001"}, "target": "ACCEPT",
         "counters": [3, 180]},
        {"mac": {"mac-source": "02:00:00:00:01:02"}, "target": "vmc", "counters": [0, 0]},
        {"src": "10.0.1.0/24", "target": "DROP", "counters": [0, 0]},
        {"dst": "10.0.1.2/32", "target": {"MARK": {"set-xmark": "0x1/0xffffffff"}}, "counters": [0, 0]},
        {"target": "inbound", "counters": [0, 0]},
    ]),
    (4, "filter", "vmc"): Chain(False, [{"protocol": "tcp", "tcp": {"dport": "22"}, "target": "ACCEPT",
                                         "counters": [0, 0]}]),
    (4, "filter", "inbound"): Chain(False, []),
    (6, "filter", "FORWARD"): Chain(True, [{"src": "fd00:1::2/128", "target": "ACCEPT", "counters": [0, 0]},
                                           {"src": "!fd00:1::2/128", "target": "DROP", "counters": [0, 0]}]),
}


def test_iptables_export_and_forged_parts() -> None:
    part, left_out, doomed = iptrules.export_part(IPT, VM)
    assert [(r["family"], r["chain"], r["rule"].get("dst") or r["rule"].get("src") or r["rule"]["target"])
            for r in part["rules"]] == [(4, "FORWARD", "10.0.1.2/32"), (4, "FORWARD", "vmc"),
                                        (6, "FORWARD", "fd00:1::2/128"), (4, "vmc", "ACCEPT")]
    assert sorted(left_out) == ["matches a whole prefix holding the VM", "unsupported: target {'MARK': "
                                "{'set-xmark': '0x1/0xffffffff'}"]
    assert doomed[-1] == ("drop", 4, "filter", "vmc")
    checked = iptrules.check_part(json.loads(json.dumps(part)), VM)
    plan = iptrules.import_plan(checked, {(4, "filter", "FORWARD"): Chain(True, []),
                                          (4, "filter", "INPUT"): Chain(True, [])}, VM)
    assert [op[0] for op in plan.ops] == ["chain", "insert", "insert", "insert", "insert"]
    for edit, message in [
        (lambda p: p["rules"][0]["rule"].update(dst="10.0.1.3/32"), "matches none"),
        (lambda p: p["rules"][0]["rule"].update(dst="10.0.1.0/24"), "matches none"),
        (lambda p: p["rules"][0]["rule"].pop("dst"), "matches none"),
        (lambda p: p["rules"][0]["rule"].update(dst="!10.0.1.2/32"), "matches none"),
        (lambda p: p["rules"][0]["rule"].update(target="SNAT"), "target SNAT"),
        (lambda p: p["rules"][0]["rule"].update(target="FORWARD"), "target FORWARD"),
        (lambda p: p["rules"][0]["rule"].update(target="inbound"),
     "not a chain of the VM"),
        (lambda p: p["rules"][0]["rule"].update(string={"string": "x", "algo": "bm"}), "'string'"),
        (lambda p: p["rules"][0].update(table="nat"), "only the filter table"),
        (lambda p: p["chains"].append({"family": 4, "table": "filter", "name": "lone", "vm": True}),
         "reached by none"),
    ]:
        forged = json.loads(json.dumps(part))
        edit(forged)
        with pytest.raises((ForeignEntryError, BundleError), match=message):
            iptrules.check_part(forged, VM)


def test_rules_are_imported_before_conntrack() -> None:
    assert import_order([Kind.COUNTERS, Kind.CONNTRACK, Kind.RULES, Kind.DHCP]) == [
        Kind.RULES, Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS]


def test_a_bundle_with_rules_round_trips() -> None:
    from xfer import bundle as bundle_mod

    payload = json.dumps({"nft": _part()}).encode()
    b = Bundle(VM, {}, {Kind.RULES: Section(Kind.RULES, ENCODING, 5, payload, {"left_out": {}})})
    back = bundle_mod.decode(bundle_mod.encode(b))
    assert section_parts(back.sections[Kind.RULES], back.vm)["nft"]["rules"] == _part()["rules"]


def test_the_manager_routes_rules_like_any_other_kind() -> None:
    import yaml

    from xfer.manager import plan, topology

    raw = yaml.safe_load("""
servers: {hv1: {gateway: gw}, hv2: {gateway: gw}}
gateways: [gw]
devices:
  fw-a: {type: firewall, kinds: [rules, conntrack], agent: "https://10.0.4.1:7443"}
  fw-b: {type: firewall, kinds: [conntrack, rules], agent: "https://10.0.4.2:7443"}
links: [[hv1, fw-a], [fw-a, gw], [hv2, fw-b], [fw-b, gw]]
""")
    p = plan.select(topology.parse(raw), "hv1", "hv2")
    assert [(r.kind, r.source.id, [d.id for d in r.destinations]) for r in p.routes] == [
        (Kind.CONNTRACK, "fw-a", ["fw-b"]), (Kind.RULES, "fw-a", ["fw-b"])]
    # one push per device pair carries both; the destination imports rules first
    assert import_order(next(iter(p.pairs().values()))) == [Kind.RULES, Kind.CONNTRACK]


@pytest.mark.parametrize("other", [
    [daddr("10.0.7.7"), {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}},
     {"jump": {"target": "c"}}],
    [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}},
               "data": {"set": [["10.0.7.7", {"jump": {"target": "c"}}]]}}}],
], ids=["unsupported-rule", "verdict-map"])
def test_a_chain_another_rule_reaches_in_any_way_is_not_the_vms(other: list[dict[str, Any]]) -> None:
    objs = listing({"forward": [[daddr("10.0.1.2"), {"jump": {"target": "c"}}], other], "c": [[ACCEPT]]})
    part, left_out, doomed = nftrules.export_part(objs, VM)
    assert part["rules"] == [] and doomed == []
    assert left_out == {"jumps to a chain other rules jump to as well": 1}


def test_iptables_rules_go_after_their_source_neighbour_in_order() -> None:
    est = {"protocol": "tcp", "conntrack": {"ctstate": "ESTABLISHED,RELATED"}, "target": "ACCEPT"}
    other = {"dst": "10.0.7.7/32", "target": "ACCEPT"}
    drop = {"target": "DROP"}
    mine = [{"dst": "10.0.1.2/32", "protocol": "tcp", "tcp": {"dport": str(p)}, "target": "ACCEPT"}
            for p in (80, 443)]
    part = {"chains": [{"family": 4, "table": "filter", "name": "FORWARD", "vm": False}],
            "rules": [{"family": 4, "table": "filter", "chain": "FORWARD", "rule": r, "after": est,
                       "before": drop} for r in mine]}
    dest = {(4, "filter", "FORWARD"): Chain(True, [est, other, drop])}
    plan = iptrules.import_plan(iptrules.check_part(part, VM), dest, VM)
    assert [(op[0], op[4]) for op in plan.ops] == [("insert", 1), ("insert", 2)]
    # the first already there: the second follows it
    dest = {(4, "filter", "FORWARD"): Chain(True, [est, mine[0], other, drop])}
    plan = iptrules.import_plan(iptrules.check_part(part, VM), dest, VM)
    assert [(op[0], op[4]) for op in plan.ops] == [("insert", 2)] and plan.skipped == 1
