"""nftables rules as data: which are the VM's, the strict check of a bundle, the import plan.

Pure logic on libnftables' JSON (what ``nft -j list ruleset`` prints); the kernel
side is ``xfer.rules.nft``. Only a small, known part of nftables' expression
language is accepted (``check_rule``): anything else cannot be proven to touch
only the VM's packets, so a source rule using it stays behind (counted in the
section's meta) and a bundle carrying it is refused whole.

    part, meta, doomed = export_part(list_ruleset("fw-a"), vm)
    commands, report = import_plan(part, list_ruleset("fw-b"), vm)
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import BundleError, ForeignEntryError
from xfer.model import VmIdentity
from xfer.rules.model import (
    MAX_LIST,
    MAX_RULES,
    Unsupported,
    Verdict,
    clip,
    context,
    freeze,
    member,
    mentions_vm,
    need,
    need_int,
    need_keys,
    need_list,
    need_name,
    need_text,
    place,
    select_checked,
    vm_ip,
    vm_mac,
)

FAMILIES = {"ip", "ip6", "inet", "bridge", "arp"}
HOOKS = {"prerouting", "input", "forward", "output", "postrouting"}
OPS = {"==", "!=", "<", ">", "<=", ">=", "in"}
PROTOCOLS = {"ether", "vlan", "arp", "ip", "icmp", "igmp", "ip6", "icmpv6", "tcp", "udp", "udplite",
             "sctp", "dccp", "ah", "esp", "comp", "th"}
META_KEYS = {"iifname", "oifname", "iif", "oif", "iiftype", "oiftype", "l4proto", "protocol",
             "nfproto", "mark", "length", "pkttype", "skuid", "skgid", "iifgroup", "oifgroup"}
CT_KEYS = {"state", "status", "direction", "mark", "zone", "l3proto", "protocol", "expiration"}
VERDICTS = {"accept", "drop", "continue", "return"}
REJECT_TYPES = {"tcp reset", "icmp", "icmpx", "icmpv6"}
LOG_KEYS = {"prefix", "level"}
LIMIT_KEYS = {"rate", "burst", "per", "rate_unit", "burst_unit", "inv"}
SET_FLAGS = {"interval"}
# Payload fields that are an address, with what kind of address they carry.
ADDRESS_FIELDS = {("ip", "saddr"): 4, ("ip", "daddr"): 4, ("ip6", "saddr"): 6, ("ip6", "daddr"): 6,
                  ("arp", "saddr ip"): 4, ("arp", "daddr ip"): 4,
                  ("ether", "saddr"): 0, ("ether", "daddr"): 0,
                  ("arp", "saddr ether"): 0, ("arp", "daddr ether"): 0}
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6, "ether_addr": 0}

ChainKey = tuple[str, str, str]    # (family, table, chain)


# --- one rule -------------------------------------------------------------------------

def _scalar(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Unsupported(f"{what}: {type(value).__name__} value")
    if isinstance(value, str):
        try:
            need_text(value, what)
        except BundleError as exc:
            raise Unsupported(str(exc)) from None
        if value[:1] in ("@", "$"):
            raise Unsupported(f"{what}: reference {value[:40]!r} where a value belongs")
    elif not 0 <= value < 2**64:
        raise Unsupported(f"{what}: number out of range")


def _value(right: Any, what: str) -> None:
    """A match's right side: a value, a list of values, an anonymous set, a prefix or a range."""
    if isinstance(right, dict):
        if len(right) != 1:
            raise Unsupported(f"{what}: unknown value form")
        (form, body), = right.items()
        if form == "set":
            if not isinstance(body, list) or len(body) > MAX_LIST:
                raise Unsupported(f"{what}: malformed set")
            for item in body:
                if isinstance(item, dict):
                    _value(item, what)
                else:
                    _scalar(item, what)
        elif form == "prefix":
            if not isinstance(body, dict) or set(body) != {"addr", "len"}:
                raise Unsupported(f"{what}: malformed prefix")
            _scalar(body["addr"], what)
            if isinstance(body["len"], bool) or not isinstance(body["len"], int) \
                    or not 0 <= body["len"] <= 128:
                raise Unsupported(f"{what}: malformed prefix length")
        elif form == "range":
            if not isinstance(body, list) or len(body) != 2:
                raise Unsupported(f"{what}: malformed range")
            for bound in body:
                _scalar(bound, what)
        else:
            raise Unsupported(f"{what}: value form {form!r}")
    elif isinstance(right, list):
        if len(right) > MAX_LIST:
            raise Unsupported(f"{what}: list too long")
        for item in right:
            _scalar(item, what)
    else:
        _scalar(right, what)


def _left(left: Any) -> tuple[str, int | None]:
    """Check a match's left side; return its name and, for an address field, its address kind."""
    if not isinstance(left, dict) or len(left) != 1:
        raise Unsupported("match on an unknown expression")
    (form, body), = left.items()
    if form == "payload":
        if not isinstance(body, dict) or set(body) != {"protocol", "field"}:
            raise Unsupported("match on a raw payload")
        proto, fld = body["protocol"], body["field"]
        if not member(proto, PROTOCOLS) or not isinstance(fld, str) or not fld.replace(" ", "").isalnum() \
                or len(fld) > 32:
            raise Unsupported(f"match on payload {clip(proto, 20)} {clip(fld, 20)}")
        return f"{proto} {fld}", ADDRESS_FIELDS.get((proto, fld))
    if form == "meta":
        if not isinstance(body, dict) or set(body) != {"key"} or not member(body["key"], META_KEYS):
            raise Unsupported(f"match on meta {clip(body, 40)}")
        return f"meta {body['key']}", None
    if form == "ct":
        if not isinstance(body, dict) or set(body) != {"key"} or not member(body["key"], CT_KEYS):
            raise Unsupported(f"match on ct {clip(body, 40)}")
        return f"ct {body['key']}", None
    raise Unsupported(f"match on {form!r}")


def _is_vm(vm: VmIdentity, value: Any, kind: int) -> bool:
    return vm_mac(vm, value) if kind == 0 else vm_ip(vm, value, kind)


def _match(body: Any, vm: VmIdentity, verdict: Verdict, shared: Counter[str]) -> None:
    if not isinstance(body, dict) or set(body) != {"op", "left", "right"} or not member(body["op"], OPS):
        raise Unsupported("malformed match")
    name, kind = _left(body["left"])
    right, op = body["right"], body["op"]
    if isinstance(right, str) and right.startswith("@"):
        try:
            verdict.sets.append(need_name(right[1:], "set reference"))
        except BundleError as exc:
            raise Unsupported(str(exc)) from None
        return
    _value(right, name)
    if kind is None or op not in ("==", "in"):
        return
    values = right["set"] if isinstance(right, dict) and "set" in right else [right]
    if values and all(_is_vm(vm, v, kind) for v in values):
        verdict.anchored = True
    elif any(_is_vm(vm, v, kind) for v in values):
        shared["matches the VM and other hosts in one set"] += 1
    elif kind and isinstance(right, dict) and "prefix" in right \
            and mentions_vm(vm, f"{right['prefix']['addr']}/{right['prefix']['len']}"):
        shared["matches a whole prefix holding the VM"] += 1


def check_rule(expr: Any, vm: VmIdentity, shared: Counter[str] | None = None) -> Verdict:
    """Check a rule's expressions against the supported subset; raise Unsupported otherwise.

    >>> check_rule([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
    ...             "right": "10.0.0.2"}}, {"accept": None}], parse_vm("10.0.0.2")).anchored
    True
    """
    if not isinstance(expr, list) or not expr or len(expr) > 64:
        raise Unsupported("malformed expression list")
    verdict = Verdict()
    shared = Counter() if shared is None else shared
    for stmt in expr:
        if not isinstance(stmt, dict) or len(stmt) != 1:
            raise Unsupported("malformed statement")
        (name, body), = stmt.items()
        if name == "match":
            _match(body, vm, verdict, shared)
        elif name in VERDICTS:
            if body is not None:
                raise Unsupported(f"malformed {name}")
        elif name in ("jump", "goto"):
            if not isinstance(body, dict) or set(body) != {"target"}:
                raise Unsupported(f"malformed {name}")
            try:
                verdict.jumps.append(need_name(body["target"], f"{name} target"))
            except BundleError as exc:
                raise Unsupported(str(exc)) from None
        elif name == "counter":
            if body is not None and not (isinstance(body, dict) and set(body) == {"packets", "bytes"}
                                         and all(type(v) is int and 0 <= v < 2**64
                                                 for v in body.values())):
                raise Unsupported("named or malformed counter")
        elif name == "reject":
            if body is not None and not (isinstance(body, dict) and set(body) <= {"type", "expr"}
                                         and member(body.get("type", "icmpx"), REJECT_TYPES)):
                raise Unsupported("malformed reject")
            if isinstance(body, dict) and "expr" in body:
                _scalar(body["expr"], "reject")
        elif name == "log":
            if not isinstance(body, dict) or not set(body) <= LOG_KEYS:
                raise Unsupported("log with options other than prefix and level")
            for v in body.values():
                _scalar(v, "log")
        elif name == "limit":
            if not isinstance(body, dict) or not set(body) <= LIMIT_KEYS or "rate" not in body:
                raise Unsupported("malformed limit")
            for k, v in body.items():
                if k == "inv":
                    if not isinstance(v, bool):
                        raise Unsupported("malformed limit")
                else:
                    _scalar(v, "limit")
        else:
            raise Unsupported(f"statement {name[:30]!r}")
    return verdict


def _norm(expr: list[Any], comment: str | None) -> Any:
    """A rule as compared across devices: counters' values do not make it another rule."""
    zeroed = [({"counter": None} if "counter" in s else s) for s in expr]
    return freeze([zeroed, comment])


# --- the ruleset ------------------------------------------------------------------------

@dataclass
class Ruleset:
    """A listing indexed: tables, chains (with base-chain info), rules per chain, sets."""

    tables: set[tuple[str, str]] = field(default_factory=set)
    chains: dict[ChainKey, dict[str, Any]] = field(default_factory=dict)
    rules: dict[ChainKey, list[dict[str, Any]]] = field(default_factory=dict)
    sets: dict[ChainKey, dict[str, Any]] = field(default_factory=dict)
    maps: dict[ChainKey, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, objs: Iterable[dict[str, Any]]) -> Ruleset:
        rs = cls()
        for obj in objs:
            (kind, body), = obj.items()
            if kind == "table":
                rs.tables.add((body["family"], body["name"]))
            elif kind == "chain":
                key = (body["family"], body["table"], body["name"])
                rs.chains[key] = body
                rs.rules.setdefault(key, [])
            elif kind == "rule":
                rs.rules.setdefault((body["family"], body["table"], body["chain"]), []).append(body)
            elif kind == "set":
                rs.sets[(body["family"], body["table"], body["name"])] = body
            elif kind == "map":
                rs.maps[(body["family"], body["table"], body["name"])] = body
        return rs

    def norms(self, key: ChainKey) -> list[Any]:
        return [_norm(r["expr"], r.get("comment")) for r in self.rules.get(key, [])]


def _address_kinds(set_type: Any) -> list[int | None]:
    """Per component of a set's key type: its address kind, or None for a non-address."""
    types = set_type if isinstance(set_type, list) else [set_type]
    return [ADDRESS_TYPES.get(t) if isinstance(t, str) else None for t in types]


def _vm_element(vm: VmIdentity, elem: Any, kinds: list[int | None]) -> bool:
    """True when one of the element's address components is exactly one of the VM's addresses."""
    parts = elem["concat"] if isinstance(elem, dict) and set(elem) == {"concat"} else [elem]
    if not isinstance(parts, list) or len(parts) != len(kinds):
        return False
    return any(k is not None and _is_vm(vm, p, k) for p, k in zip(parts, kinds, strict=True))


def _set_def(body: dict[str, Any]) -> dict[str, Any]:
    out = {"family": body["family"], "table": body["table"], "name": body["name"], "type": body["type"]}
    if body.get("flags"):
        out["flags"] = list(body["flags"])
    return out


# --- export -----------------------------------------------------------------------------

def export_part(objs: Sequence[dict[str, Any]], vm: VmIdentity
                ) -> tuple[dict[str, Any], dict[str, int], list[dict[str, Any]]]:
    """The VM's rules, chains and set elements in a listing.

    Returns the section part, the counts of what was left out and why, and the
    commands that delete what the part carries (``forget`` at the source).
    """
    rs = Ruleset.parse(objs)
    shared: Counter[str] = Counter()
    literals = _literals(vm)
    verdicts: dict[tuple[ChainKey, int], Verdict | str] = {}

    def verdict(r: tuple[ChainKey, int]) -> Verdict | str:
        if r not in verdicts:
            expr = rs.rules[r[0]][r[1]]["expr"]
            try:
                verdicts[r] = check_rule(expr, vm, shared)
            except Unsupported as exc:
                verdicts[r] = str(exc)
                if _mentions(expr, literals):
                    left_out[f"unsupported: {exc}"[:80]] += 1
        return verdicts[r]

    left_out: Counter[str] = Counter()
    maybe = {(key, i) for key, rules in rs.rules.items() for i, rule in enumerate(rules)
             if _mentions(rule["expr"], literals)}
    for r in maybe:        # every rule naming the VM is checked, so that what is left out is counted
        verdict(r)
    sel = select_checked({key: len(rules) for key, rules in rs.rules.items()},
                         {key for key, body in rs.chains.items() if "hook" not in body},
                         verdict, maybe.__contains__,
                         lambda r: raw_jumps(rs.rules[r[0]][r[1]]["expr"]),
                         lambda r, v: _set_problem(rs, r[0], v))
    left_out.update(sel.left_out)
    left_out.update({k: v for k, v in shared.items() if v})

    part: dict[str, Any] = {"tables": [], "chains": [], "sets": [], "elements": [], "rules": []}
    doomed: list[dict[str, Any]] = []
    tables: list[tuple[str, str]] = []
    used_sets: list[ChainKey] = []
    mine_by_chain: dict[ChainKey, set[int]] = {}
    for key, i in sel.rules:
        mine_by_chain.setdefault(key, set()).add(i)

    def chain_entry(key: ChainKey, vm_chain: bool) -> None:
        if (key[0], key[1]) not in tables:
            tables.append((key[0], key[1]))
        body = rs.chains[key]
        entry: dict[str, Any] = {"family": key[0], "table": key[1], "name": key[2], "vm": vm_chain}
        if "hook" in body:
            entry["base"] = {"type": body["type"], "hook": body["hook"], "prio": body["prio"]}
        part["chains"].append(entry)

    def rule_entry(key: ChainKey, rule: dict[str, Any], after: Any, before: Any) -> None:
        entry = {"family": key[0], "table": key[1], "chain": key[2], "expr": copy.deepcopy(rule["expr"]),
                 "after": after, "before": before}
        if rule.get("comment") is not None:
            entry["comment"] = rule["comment"]
        part["rules"].append(entry)
        v = verdicts[(key, rule_index[id(rule)])]
        assert isinstance(v, Verdict)
        used_sets.extend((key[0], key[1], s) for s in v.sets if (key[0], key[1], s) not in used_sets)

    rule_index = {id(r): i for rules in rs.rules.values() for i, r in enumerate(rules)}
    for key, mine in mine_by_chain.items():
        chain_entry(key, False)
        rules = rs.rules[key]
        for i in sorted(mine):
            preceding, following = context(rules, i, mine)
            rule_entry(key, rules[i], _ctx(preceding), _ctx(following))
            doomed.append({"delete": {"rule": {"family": key[0], "table": key[1], "chain": key[2],
                                               "handle": rules[i]["handle"]}}})
    for key in sel.chains:
        chain_entry(key, True)
        for rule in rs.rules[key]:
            rule_entry(key, rule, None, None)
    # Flush every chain of the VM's before deleting any: one may jump to another.
    refs = [{"family": key[0], "table": key[1], "name": key[2]} for key in sel.chains]
    doomed += [{"flush": {"chain": ref}} for ref in refs]
    doomed += [{"delete": {"chain": copy.deepcopy(ref)}} for ref in refs]
    for skey in used_sets:
        body = rs.sets[skey]
        part["sets"].append({**_set_def(body), "elem": copy.deepcopy(body.get("elem", []))})
        if (skey[0], skey[1]) not in tables:
            tables.append((skey[0], skey[1]))
    _address_elements(rs, vm, part, doomed, tables, left_out)
    part["tables"] = [{"family": f, "name": n} for f, n in tables]
    return part, dict(left_out), doomed


def _ctx(rule: dict[str, Any] | None) -> Any:
    if rule is None:
        return None
    out = {"expr": copy.deepcopy(rule["expr"])}
    if rule.get("comment") is not None:
        out["comment"] = rule["comment"]
    return out


def _set_problem(rs: Ruleset, chain: ChainKey, verdict: Verdict) -> str | None:
    for name in verdict.sets:
        key = (chain[0], chain[1], name)
        if key in rs.maps:
            return "a map reference"
        body = rs.sets.get(key)
        if body is None:
            return "a reference to a missing set"
        if not set(body.get("flags", [])) <= SET_FLAGS:
            return "a reference to a set with flags " + ",".join(sorted(body.get("flags", [])))
    return None


def _literals(vm: VmIdentity) -> frozenset[str]:
    return frozenset((*vm.addresses, *vm.macs))


def _mentions(expr: Any, literals: frozenset[str]) -> bool:
    """A cheap look: does a match name one of the VM's addresses, or a prefix or range (which
    may hold one)? Only such rules can be the VM's or be counted as left out."""
    for stmt in expr if isinstance(expr, list) else ():
        body = stmt.get("match") if isinstance(stmt, dict) else None
        if not isinstance(body, dict):
            if isinstance(stmt, dict) and not stmt.keys() <= _PLAIN \
                    and any(a in json.dumps(stmt) for a in literals):
                return True
            continue
        right = body.get("right")
        if isinstance(right, str):
            if right in literals:
                return True
        elif isinstance(right, dict):
            if "prefix" in right or "range" in right:
                return True
            items = right.get("set")
            if isinstance(items, list) and any(isinstance(v, dict) or v in literals for v in items
                                               if isinstance(v, str | dict)):
                return True
    return False


_PLAIN = {"counter", "accept", "drop", "continue", "return", "jump", "goto", "log", "limit", "reject"}


def raw_jumps(expr: Any) -> list[str]:
    """Every chain a rule can jump or go to, wherever the jump sits (verdict maps included)."""
    found: list[str] = []
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                target = value.get("target") if isinstance(value, dict) else None
                if key in ("jump", "goto") and isinstance(target, str):
                    found.append(target)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _address_elements(rs: Ruleset, vm: VmIdentity, part: dict[str, Any], doomed: list[dict[str, Any]],
                      tables: list[tuple[str, str]], left_out: Counter[str]) -> None:
    """The VM's elements in named address sets (the ones a shared rule such as
    ``ip saddr @trusted accept`` applies to the VM), and maps left out."""
    for key, body in rs.sets.items():
        kinds = _address_kinds(body.get("type"))
        if not any(k is not None for k in kinds):
            continue
        mine = [e for e in body.get("elem", []) if _vm_element(vm, e, kinds)]
        covering = [e for e in body.get("elem", []) if isinstance(e, dict) and "prefix" in e
                    and mentions_vm(vm, f"{e['prefix'].get('addr')}/{e['prefix'].get('len')}")]
        if covering:
            left_out["set element is a prefix holding the VM"] += len(covering)
        if not mine:
            continue
        if not set(body.get("flags", [])) <= SET_FLAGS:
            left_out["element of a set with timeouts or other flags"] += len(mine)
            continue
        part["elements"].append({**_set_def(body), "elem": copy.deepcopy(mine)})
        if (key[0], key[1]) not in tables:
            tables.append((key[0], key[1]))
        doomed.append({"delete": {"element": {"family": key[0], "table": key[1], "name": key[2],
                                              "elem": copy.deepcopy(mine)}}})
    for body in rs.maps.values():
        kinds = _address_kinds(body.get("type"))
        hits = [e for e in body.get("elem", []) if isinstance(e, list) and e
                and _vm_element(vm, e[0], kinds)]
        if hits:
            left_out["map element (maps are not carried)"] += len(hits)


# --- the bundle's part, checked -----------------------------------------------------------

def check_part(part: Any, vm: VmIdentity) -> dict[str, Any]:
    """Check a section's nftables part strictly; ForeignEntryError for anything not the VM's.

    Every rule outside the bundle's own chains must be anchored to the VM's exact
    address; every jump must land in a chain the bundle carries; every element of
    an address set must carry one of the VM's addresses.
    """
    p = need_keys(part, ("tables", "chains", "sets", "elements", "rules"), (), "nft part")
    tables = {(_family(t["family"]), need_name(t["name"], "table"))
              for t in (need_keys(t, ("family", "name"), (), "table")
                        for t in need_list(p["tables"], "tables", 256))}
    chains: dict[ChainKey, dict[str, Any]] = {}
    for c in need_list(p["chains"], "chains", MAX_RULES):
        c = need_keys(c, ("family", "table", "name", "vm"), ("base",), "chain")
        key = (_family(c["family"]), need_name(c["table"], "table"), need_name(c["name"], "chain"))
        need(c["vm"], bool, "chain vm")
        if (key[0], key[1]) not in tables:
            raise BundleError(f"chain {key[2]} is in a table the bundle does not name")
        if key in chains:
            raise BundleError(f"chain {key[2]} appears twice")
        if "base" in c:
            if c["vm"]:
                raise ForeignEntryError(f"chain {key[2]}: a chain of the VM's own cannot be a base chain")
            b = need_keys(c["base"], ("type", "hook", "prio"), (), "base chain")
            if b["type"] != "filter" or not member(b["hook"], HOOKS):
                raise ForeignEntryError(f"chain {key[2]}: only filter chains on "
                                        f"{'/'.join(sorted(HOOKS))} hooks are accepted")
            need_int(b["prio"], "chain prio", -1000, 1000)
        chains[key] = c
    sets: dict[ChainKey, dict[str, Any]] = {}
    for s in need_list(p["sets"], "sets", 256):
        key = _check_set(s, tables, "set")
        if key in sets:
            raise BundleError(f"set {key[2]} appears twice")
        for e in s["elem"]:
            try:
                _value(e["concat"] if isinstance(e, dict) and set(e) == {"concat"} else e, "set element")
            except Unsupported as exc:
                raise ForeignEntryError(f"set {key[2]}: {exc}") from None
        sets[key] = s
    for s in need_list(p["elements"], "elements", 256):
        key = _check_set(s, tables, "element set")
        kinds = _address_kinds(s["type"])
        for e in s["elem"]:
            if not _vm_element(vm, e, kinds):
                raise ForeignEntryError(f"set {key[2]}: element {clip(e, 60)} carries none of "
                                        f"VM {vm.id}'s addresses")
            try:
                _value(e["concat"] if isinstance(e, dict) else e, "set element")
            except Unsupported as exc:
                raise ForeignEntryError(f"set {key[2]}: {exc}") from None
    vm_chains = {k for k, c in chains.items() if c["vm"]}
    reached: set[ChainKey] = set()
    for r in need_list(p["rules"], "rules", MAX_RULES):
        r = need_keys(r, ("family", "table", "chain", "expr", "after", "before"), ("comment",), "rule")
        key = (_family(r["family"]), need_name(r["table"], "table"), need_name(r["chain"], "chain"))
        if key not in chains:
            raise BundleError(f"rule in chain {key[2]}, which the bundle does not name")
        if "comment" in r:
            need_text(r["comment"], "rule comment")
        for ctx in (r["after"], r["before"]):
            if ctx is not None:
                need_keys(ctx, ("expr",), ("comment",), "rule context")
                need_list(ctx["expr"], "rule context", 64)
        try:
            v = check_rule(r["expr"], vm)
        except Unsupported as exc:
            raise ForeignEntryError(f"rule in chain {key[2]}: {exc}; not provably VM {vm.id}'s") from None
        if key not in vm_chains and not v.anchored:
            raise ForeignEntryError(f"rule in chain {key[2]} matches none of VM {vm.id}'s addresses "
                                    f"exactly (another host's, or a catch-all): refused")
        for target in v.jumps:
            tkey = (key[0], key[1], target)
            if tkey not in vm_chains:
                raise ForeignEntryError(f"rule in chain {key[2]} jumps to {target}, "
                                        f"which is not a chain of the VM's in the bundle")
            reached.add(tkey)
        for name in v.sets:
            if (key[0], key[1], name) not in sets:
                raise ForeignEntryError(f"rule in chain {key[2]} uses set {name}, "
                                        f"which the bundle does not carry")
    if vm_chains - reached:
        raise ForeignEntryError(f"chain {sorted(vm_chains - reached)[0][2]} is reached by none of "
                                "the bundle's rules")
    return p


def _family(value: Any) -> str:
    if not member(value, FAMILIES):
        raise BundleError(f"nftables family {str(value)[:20]!r} is not accepted")
    return str(value)


def _check_set(s: Any, tables: set[tuple[str, str]], what: str) -> ChainKey:
    s = need_keys(s, ("family", "table", "name", "type", "elem"), ("flags",), what)
    key = (_family(s["family"]), need_name(s["table"], "table"), need_name(s["name"], "set"))
    if (key[0], key[1]) not in tables:
        raise BundleError(f"{what} {key[2]} is in a table the bundle does not name")
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    if not 1 <= len(types) <= 8 or not all(isinstance(t, str) and t.replace("_", "").isalnum()
                                           and len(t) < 32 for t in types):
        raise BundleError(f"{what} {key[2]}: malformed type")
    if not all(member(f, SET_FLAGS) for f in need_list(s.get("flags", []), "set flags", 4)):
        raise ForeignEntryError(f"{what} {key[2]}: only interval sets are accepted")
    need_list(s["elem"], f"{what} elements", MAX_RULES)
    return key


# --- import ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """The commands of one import (one transaction) and what they do."""

    commands: list[dict[str, Any]] = field(default_factory=list)
    undo: list[dict[str, Any]] = field(default_factory=list)
    created: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


def import_plan(part: dict[str, Any], objs: Sequence[dict[str, Any]], vm: VmIdentity) -> Plan:
    """The commands that install a checked part into a destination listing (nothing if all there).

    Refuses (ForeignEntryError) a chain of the VM's that exists at the destination
    with other rules: other hosts' traffic may reach it there.
    """
    rs = Ruleset.parse(objs)
    plan = Plan()
    created: list[dict[str, Any]] = []     # chains, sets and tables this plan adds, for the undo
    for t in part["tables"]:
        if (t["family"], t["name"]) not in rs.tables:
            ref = {"family": t["family"], "name": t["name"]}
            plan.commands.append({"add": {"table": ref}})
            created.append({"table": copy.deepcopy(ref)})
    by_chain: dict[ChainKey, list[dict[str, Any]]] = {}
    for r in part["rules"]:
        by_chain.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
    new_vm_chains: list[ChainKey] = []
    for c in part["chains"]:
        key = (c["family"], c["table"], c["name"])
        ref = {"family": key[0], "table": key[1], "name": key[2]}
        if key in rs.chains:
            if c["vm"]:
                have = rs.norms(key)
                want = [_norm(r["expr"], r.get("comment")) for r in by_chain.get(key, [])]
                if "hook" in rs.chains[key] or have != want:
                    raise ForeignEntryError(f"chain {key[2]} exists on this device with other rules: "
                                            f"it is not VM {vm.id}'s to change; nothing imported")
                plan.skipped += len(want)
            continue
        chain = dict(ref)
        if "base" in c:
            # NOTE: a base chain created here gets policy accept whatever the source's
            # policy: a policy is a catch-all, it is not the VM's, and a drop policy
            # would cut every other host this device forwards.
            chain.update(c["base"], policy="accept")
            plan.warnings.append(f"created base chain {key[2]} with policy accept")
        elif not c["vm"]:
            plan.warnings.append(f"created chain {key[2]}, which no rule here jumps to: "
                                 "the VM's rules in it apply only once one does")
        plan.commands.append({"add": {"chain": chain}})
        if c["vm"]:
            new_vm_chains.append(key)
        else:
            created.append({"chain": dict(ref)})
    for s in part["sets"]:
        key = (s["family"], s["table"], s["name"])
        if key not in rs.sets:
            plan.commands.append({"add": {"set": _set_body(s, s["elem"])}})
            created.append({"set": {"family": key[0], "table": key[1], "name": key[2]}})
    for s in part["elements"]:
        key = (s["family"], s["table"], s["name"])
        present = {freeze(e) for e in rs.sets.get(key, {}).get("elem", [])}
        if key in rs.maps:
            raise ForeignEntryError(f"{key[2]} is a map on this device, not a set; nothing imported")
        if key in rs.sets and freeze(rs.sets[key].get("type")) != freeze(s["type"]):
            raise ForeignEntryError(f"set {key[2]} has another type on this device; nothing imported")
        if key not in rs.sets and not any((x["family"], x["table"], x["name"]) == key for x in part["sets"]):
            plan.commands.append({"add": {"set": _set_body(s, [])}})
            created.append({"set": {"family": key[0], "table": key[1], "name": key[2]}})
        new = [e for e in s["elem"] if freeze(e) not in present]
        plan.skipped += len(s["elem"]) - len(new)
        if new:
            ref = {"family": key[0], "table": key[1], "name": key[2], "elem": new}
            plan.commands.append({"add": {"element": ref}})
            plan.undo.append({"delete": {"element": copy.deepcopy(ref)}})
            plan.created += len(new)
    for key in new_vm_chains:
        for r in by_chain.get(key, []):
            plan.commands.append({"add": {"rule": _rule_body(key, r)}})
            plan.created += 1
    for key, rules in by_chain.items():
        if any(key == (c["family"], c["table"], c["name"]) and c["vm"] for c in part["chains"]):
            continue
        existing = rs.norms(key)
        handles = [r["handle"] for r in rs.rules.get(key, [])]
        incoming = [(_norm(r["expr"], r.get("comment")), _ctx_norm(r["after"]), _ctx_norm(r["before"]))
                    for r in rules]
        for r, spot in zip(rules, place(existing, incoming), strict=True):
            if spot.exists:
                plan.skipped += 1
                continue
            body = _rule_body(key, r)
            if spot.position < len(handles):
                body["handle"] = handles[spot.position]
                plan.commands.append({"insert": {"rule": body}})
            else:
                plan.commands.append({"add": {"rule": body}})
            plan.created += 1
    # Undo (the other backend failed): after the rules (deleted by content, see
    # delete_rules), the elements added above, then what this plan created, innermost first.
    refs = [{"family": key[0], "table": key[1], "name": key[2]} for key in new_vm_chains]
    plan.undo += [{"flush": {"chain": ref}} for ref in refs]
    plan.undo += [{"delete": {"chain": copy.deepcopy(ref)}} for ref in refs]
    plan.undo += [{"delete": obj} for obj in reversed(created)]
    return plan


def _ctx_norm(ctx: dict[str, Any] | None) -> Any:
    return None if ctx is None else _norm(ctx["expr"], ctx.get("comment"))


def _set_body(s: dict[str, Any], elem: list[Any]) -> dict[str, Any]:
    body = {"family": s["family"], "table": s["table"], "name": s["name"], "type": s["type"]}
    if s.get("flags"):
        body["flags"] = list(s["flags"])
    if elem:
        body["elem"] = copy.deepcopy(elem)
    return body


def _rule_body(key: ChainKey, r: dict[str, Any]) -> dict[str, Any]:
    body = {"family": key[0], "table": key[1], "chain": key[2], "expr": copy.deepcopy(r["expr"])}
    if "comment" in r:
        body["comment"] = r["comment"]
    return body


def delete_rules(part: dict[str, Any], objs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Commands deleting the part's container rules from a listing, matched by content (undo)."""
    rs = Ruleset.parse(objs)
    out: list[dict[str, Any]] = []
    taken: set[int] = set()
    vm_chains = {(c["family"], c["table"], c["name"]) for c in part["chains"] if c["vm"]}
    for r in part["rules"]:
        key = (r["family"], r["table"], r["chain"])
        if key in vm_chains:
            continue
        want = _norm(r["expr"], r.get("comment"))
        for have in rs.rules.get(key, []):
            if have["handle"] not in taken and _norm(have["expr"], have.get("comment")) == want:
                taken.add(have["handle"])
                out.append({"delete": {"rule": {"family": key[0], "table": key[1], "chain": key[2],
                                                "handle": have["handle"]}}})
                break
    return out
