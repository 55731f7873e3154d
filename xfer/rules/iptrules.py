"""iptables-legacy rules as data: which are the VM's, the strict check, the import plan.

Pure logic on python-iptables' rule dictionaries (``xfer.rules.ipt`` reads and
writes them). Only the filter table and a small set of matches and targets are
carried; everything else cannot be proven to touch only the VM's packets.

    part, left_out, doomed = export_part(read("fw-a"), vm)
    ops, report = import_plan(check_part(part, vm), read("fw-b"))
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import BundleError, ForeignEntryError
from xfer.model import VmIdentity
from xfer.rules.ipt import Chain, ChainKey
from xfer.rules.model import (
    MAX_RULES,
    NAME_RE,
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

BUILTIN = {"INPUT", "FORWARD", "OUTPUT"}
VERDICTS = {"ACCEPT", "DROP", "RETURN"}
PROTOCOLS = {"tcp", "udp", "icmp", "ipv6-icmp", "sctp"}
MATCHES = {"tcp": {"sport", "dport", "tcp-flags", "syn"}, "udp": {"sport", "dport"},
           "icmp": {"icmp-type"}, "icmp6": {"icmpv6-type"}, "conntrack": {"ctstate"},
           "state": {"state"}, "mac": {"mac-source"}, "comment": {"comment"},
           "multiport": {"dports", "sports", "ports"}}
BASE_KEYS = {"src", "dst", "protocol", "in-interface", "out-interface", "target", "counters"}
REJECT_WITH = {"icmp-port-unreachable", "icmp-net-unreachable", "icmp-host-unreachable",
               "icmp-proto-unreachable", "icmp-net-prohibited", "icmp-host-prohibited",
               "icmp-admin-prohibited", "tcp-reset", "icmp6-no-route", "icmp6-adm-prohibited",
               "icmp6-addr-unreachable", "icmp6-port-unreachable", "no-route", "adm-prohibited",
               "addr-unreachable", "port-unreachable"}
_HOST_RE = re.compile(r"^([0-9a-f.:]+)/(32|128)$")
_IFACE_RE = re.compile(r"^!?[A-Za-z0-9_.\-]{1,15}\+?$")


def _text(value: Any, what: str) -> None:
    """A value python-iptables gives as a string, or a list of strings (``["!", "80"]``)."""
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > 4:
        raise Unsupported(f"{what}: malformed value")
    for item in items:
        try:
            need_text(item, what)
        except BundleError as exc:
            raise Unsupported(str(exc)) from None


def check_rule(rule: Any, family: int, vm: VmIdentity, shared: Counter[str] | None = None) -> Verdict:
    """Check one rule dictionary against the supported subset; raise Unsupported otherwise.

    >>> check_rule({"dst": "10.0.0.2/32", "target": "ACCEPT"}, 4, parse_vm("10.0.0.2")).anchored
    True
    """
    if not isinstance(rule, dict) or "target" not in rule:
        raise Unsupported("malformed rule")
    verdict = Verdict()
    shared = Counter() if shared is None else shared
    for key, value in rule.items():
        if key in ("src", "dst"):
            if not isinstance(value, str) or len(value) > 64:
                raise Unsupported(f"malformed {key}")
            host = _HOST_RE.match(value)
            if host and host.group(2) == ("32" if family == 4 else "128"):
                if vm_ip(vm, host.group(1), family):
                    verdict.anchored = True
            elif not value.startswith("!") and mentions_vm(vm, value):
                shared["matches a whole prefix holding the VM"] += 1
        elif key == "protocol":
            if not member(value, PROTOCOLS):
                raise Unsupported(f"protocol {clip(value, 20)}")
        elif key in ("in-interface", "out-interface"):
            if not isinstance(value, str) or not _IFACE_RE.match(value):
                raise Unsupported(f"malformed {key}")
        elif key == "counters":
            if not (isinstance(value, list) and len(value) == 2
                    and all(type(v) is int and 0 <= v < 2**64 for v in value)):
                raise Unsupported("malformed counters")
        elif key == "target":
            _target(value, verdict)
        elif key in MATCHES:
            if not isinstance(value, dict) or not value or not set(value) <= MATCHES[key]:
                raise Unsupported(f"match {key} with options other than {sorted(MATCHES[key])}")
            for opt, v in value.items():
                _text(v, f"{key} {opt}")
            mac = value.get("mac-source")
            if key == "mac" and isinstance(mac, str) and vm_mac(vm, mac.lower()):
                verdict.anchored = True
        else:
            raise Unsupported(f"match or field {str(key)[:30]!r}")
    return verdict


def _target(value: Any, verdict: Verdict) -> None:
    if isinstance(value, str):
        if value in VERDICTS:
            return
        if not NAME_RE.match(value) or value.isupper():
            # Upper-case names are targets (extensions); chains we carry are user chains.
            raise Unsupported(f"target {clip(value, 30)}")
        verdict.jumps.append(value)
        return
    if isinstance(value, dict) and len(value) == 1:
        (name, body), = value.items()
        if name == "goto" and isinstance(body, str) and NAME_RE.match(body) and not body.isupper():
            verdict.jumps.append(body)
            return
        if name == "REJECT" and isinstance(body, dict) and set(body) <= {"reject-with"} \
                and member(body.get("reject-with", "icmp-port-unreachable"), REJECT_WITH):
            return
    raise Unsupported(f"target {clip(value, 40)}")


def _norm(rule: Mapping[str, Any]) -> Any:
    return freeze({k: v for k, v in rule.items() if k != "counters"})


# --- export ---------------------------------------------------------------------------

def export_part(chains: Mapping[ChainKey, Chain], vm: VmIdentity
                ) -> tuple[dict[str, Any], dict[str, int], list[tuple[Any, ...]]]:
    """The VM's rules and chains in the legacy filter tables; what was left out; forget ops."""
    shared: Counter[str] = Counter()
    left_out: Counter[str] = Counter()

    def verdict(r: tuple[ChainKey, int]) -> Verdict | str:
        rule = chains[r[0]].rules[r[1]]
        try:
            return check_rule(rule, r[0][0], vm, shared)
        except Unsupported as exc:
            if _mentions(rule, vm):
                left_out[f"unsupported: {exc}"[:80]] += 1
            return str(exc)

    maybe = {(key, i) for key, c in chains.items() for i, rule in enumerate(c.rules) if _mentions(rule, vm)}
    verdicts = {r: verdict(r) for r in maybe}    # every rule naming the VM, so what is left is counted
    sel = select_checked({key: len(c.rules) for key, c in chains.items()},
                         {key for key, c in chains.items() if not c.builtin},
                         lambda r: verdicts[r] if r in verdicts else verdict(r), maybe.__contains__,
                         lambda r: raw_jumps(chains[r[0]].rules[r[1]]))
    left_out.update(sel.left_out)
    left_out.update({k: v for k, v in shared.items() if v})
    part: dict[str, Any] = {"chains": [], "rules": []}
    doomed: list[tuple[Any, ...]] = []
    mine: dict[ChainKey, set[int]] = {}
    for key, i in sel.rules:
        mine.setdefault(key, set()).add(i)
    for key, idx in mine.items():
        part["chains"].append({"family": key[0], "table": key[1], "name": key[2], "vm": False})
        rules = chains[key].rules
        for i in sorted(idx):
            preceding, following = context(rules, i, idx)
            # "after": the rule it goes after (its source predecessor); "before": its successor
            part["rules"].append({"family": key[0], "table": key[1], "chain": key[2],
                                  "rule": copy.deepcopy(rules[i]), "after": copy.deepcopy(preceding),
                                  "before": copy.deepcopy(following)})
            doomed.append(("delete", key[0], key[1], key[2], rules[i]))
    for key in sel.chains:
        part["chains"].append({"family": key[0], "table": key[1], "name": key[2], "vm": True})
        for rule in chains[key].rules:
            part["rules"].append({"family": key[0], "table": key[1], "chain": key[2],
                                  "rule": copy.deepcopy(rule), "after": None, "before": None})
    doomed += [("drop", key[0], key[1], key[2]) for key in sel.chains]
    return part, dict(left_out), doomed


def _mentions(rule: Mapping[str, Any], vm: VmIdentity) -> bool:
    """A cheap look: could this rule name the VM (its address, a prefix, its MAC)?"""
    for key in ("src", "dst"):
        value = rule.get(key)
        if isinstance(value, str) and (not value.endswith(("/32", "/128")) or
                                       value.split("/")[0].lstrip("!") in vm.addresses):
            return True
    mac = rule.get("mac")
    return isinstance(mac, dict) and any(m in repr(mac).lower() for m in vm.macs)


def raw_jumps(rule: Mapping[str, Any]) -> list[str]:
    """The user chain a rule jumps or goes to, supported or not (upper-case names are targets)."""
    target = rule.get("target")
    if isinstance(target, dict) and len(target) == 1 and isinstance(target.get("goto"), str):
        target = target["goto"]
    return [target] if isinstance(target, str) and target not in VERDICTS and not target.isupper() else []


# --- the bundle's part, checked ---------------------------------------------------------------

def check_part(part: Any, vm: VmIdentity) -> dict[str, Any]:
    """Check a section's iptables part strictly; ForeignEntryError for anything not the VM's."""
    p = need_keys(part, ("chains", "rules"), (), "iptables part")
    chains: dict[ChainKey, bool] = {}
    for c in need_list(p["chains"], "chains", MAX_RULES):
        c = need_keys(c, ("family", "table", "name", "vm"), (), "chain")
        key = (_family(c["family"]), _filter(c["table"]), need_name(c["name"], "chain"))
        need(c["vm"], bool, "chain vm")
        if key in chains:
            raise BundleError(f"chain {key[2]} appears twice")
        if c["vm"] and (key[2] in BUILTIN or key[2].isupper()):
            raise ForeignEntryError(f"chain {key[2]}: a chain of the VM's own must be a user chain")
        chains[key] = c["vm"]
    reached: set[ChainKey] = set()
    for r in need_list(p["rules"], "rules", MAX_RULES):
        r = need_keys(r, ("family", "table", "chain", "rule", "after", "before"), (), "rule")
        key = (_family(r["family"]), _filter(r["table"]), need_name(r["chain"], "chain"))
        if key not in chains:
            raise BundleError(f"rule in chain {key[2]}, which the bundle does not name")
        for ctx in (r["after"], r["before"]):
            if ctx is not None:
                need(ctx, dict, "rule context")
        try:
            v = check_rule(r["rule"], key[0], vm)
        except Unsupported as exc:
            raise ForeignEntryError(f"rule in chain {key[2]}: {exc}; not provably VM {vm.id}'s") from None
        if not chains[key] and not v.anchored:
            raise ForeignEntryError(f"rule in chain {key[2]} matches none of VM {vm.id}'s addresses "
                                    f"exactly (another host's, or a catch-all): refused")
        for target in v.jumps:
            tkey = (key[0], key[1], target)
            if not chains.get(tkey):
                raise ForeignEntryError(f"rule in chain {key[2]} jumps to {target}, "
                                        f"which is not a chain of the VM's in the bundle")
            reached.add(tkey)
    orphans = {k for k, is_vm in chains.items() if is_vm} - reached
    if orphans:
        raise ForeignEntryError(f"chain {sorted(orphans)[0][2]} is reached by none of the bundle's rules")
    return p


def _family(value: Any) -> int:
    return need_int(value, "family", 4, 6) if value in (4, 6) else _bad_family(value)


def _bad_family(value: Any) -> int:
    raise BundleError(f"iptables family {str(value)[:10]!r} is not 4 or 6")


def _filter(value: Any) -> str:
    if value != "filter":
        raise ForeignEntryError(f"iptables table {str(value)[:20]!r}: only the filter table is carried")
    return "filter"


# --- import --------------------------------------------------------------------------------

@dataclass
class Plan:
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    undo: list[tuple[Any, ...]] = field(default_factory=list)
    created: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


def import_plan(part: dict[str, Any], chains: Mapping[ChainKey, Chain], vm: VmIdentity) -> Plan:
    """The ops that install a checked part into a destination's tables (none if all there)."""
    plan = Plan()
    by_chain: dict[ChainKey, list[dict[str, Any]]] = {}
    for r in part["rules"]:
        by_chain.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
    vm_chains = {(c["family"], c["table"], c["name"]) for c in part["chains"] if c["vm"]}
    new_vm_chains: list[ChainKey] = []
    for c in part["chains"]:
        key = (c["family"], c["table"], c["name"])
        if key in chains:
            if c["vm"]:
                have = [_norm(r) for r in chains[key].rules]
                want = [_norm(r["rule"]) for r in by_chain.get(key, [])]
                if chains[key].builtin or have != want:
                    raise ForeignEntryError(f"chain {key[2]} exists on this device with other rules: "
                                            f"it is not VM {vm.id}'s to change; nothing imported")
                plan.skipped += len(want)
            continue
        if key[2] in BUILTIN:
            continue      # a legacy table always has its built-in chains
        plan.ops.append(("chain", *key))
        if c["vm"]:
            new_vm_chains.append(key)
        else:
            plan.warnings.append(f"created chain {key[2]}, which no rule here jumps to: "
                                 "the VM's rules in it apply only once one does")
        plan.undo.append(("drop", *key))
    for key in new_vm_chains:
        for r in by_chain.get(key, []):
            plan.ops.append(("insert", *key, None, r["rule"]))
            plan.created += 1
    for key, rules in by_chain.items():
        if key in vm_chains:
            continue
        existing = [_norm(r) for r in chains[key].rules] if key in chains else []
        shadow: list[Any] = list(range(len(existing)))    # existing rules by index, new ones as None
        incoming = [(_norm(r["rule"]), _ctx(r["after"]), _ctx(r["before"])) for r in rules]
        for r, spot in zip(rules, place(existing, incoming), strict=True):
            if spot.exists:
                plan.skipped += 1
                continue
            at = shadow.index(spot.position) if spot.position < len(existing) else len(shadow)
            shadow.insert(at, None)
            plan.ops.append(("insert", *key, at if at < len(shadow) - 1 else None, r["rule"]))
            plan.undo.insert(0, ("delete", *key, r["rule"]))
            plan.created += 1
    return plan


def _ctx(rule: Any) -> Any:
    return None if rule is None else _norm(rule)
