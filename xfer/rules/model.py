"""What both rule backends share: strict JSON, the VM's addresses, selection and placement.

Pure logic, no kernel. A backend (``nftrules``, ``iptrules``) describes its ruleset
as chains of rules and says, per rule, whether it is *anchored* to the VM (it
matches one of the VM's addresses exactly, so every packet it can match is the
VM's), what is wrong with it (an expression we cannot prove harmless), and which
chains it jumps to. ``select`` then finds the VM's rules and chains; ``place``
finds where a rule goes in the destination's chain. See docs/rules.md.

    >>> sel = select({"c": [["a"], ["b"]]}, regular={"c"}, anchored=lambda r: r == ["a"],
    ...              problem=lambda r: None, jumps=lambda r: ())
    >>> sel.rules
    [('c', 0)]
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from xfer.errors import BundleError, UsageError
from xfer.model import VmIdentity, normalize_mac

ENCODING = "rules/1"
MAX_PAYLOAD = 4 * 1024 * 1024    # bytes of a rules section
MAX_DEPTH = 24                   # JSON nesting (a rule's expressions nest ~8 deep)
MAX_RULES = 4096                 # rules, chains and set elements, each
MAX_STRING = 256                 # any string in a rule
MAX_LIST = 1024                  # any list inside one rule or set
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")

C = TypeVar("C", bound=Hashable)
R = TypeVar("R")


# --- strict JSON ---------------------------------------------------------------------

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET_RE = re.compile(r"[\[\]{}]")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BundleError(f"rules section repeats key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BundleError(f"rules section holds {name}, which is not JSON")


def load_strict(raw: bytes, what: str = "rules section") -> Any:
    """Parse hostile JSON: bounded size and nesting, no repeated keys, no NaN/Infinity.

    >>> load_strict(b'{"a": [1, 2]}')
    {'a': [1, 2]}
    """
    if len(raw) > MAX_PAYLOAD:
        raise BundleError(f"{what} is {len(raw)} bytes, over the limit of {MAX_PAYLOAD}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{what} is not UTF-8") from None
    # Depth is checked before parsing, so a hostile nest never reaches the recursive parser.
    depth = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise BundleError(f"{what} nests deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{what} is corrupted: {exc}") from None


def clip(value: Any, limit: int = 40) -> str:
    """Hostile text for a one-line message: cut short, control characters escaped."""
    text = str(value)[:limit]
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def need(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of ``kind`` (bool is never an int here), else BundleError."""
    if isinstance(value, bool) and kind is not bool and (kind is int or bool not in _tuple(kind)):
        raise BundleError(f"{what}: expected {_names(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BundleError(f"{what}: expected {_names(kind)}, got {type(value).__name__}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def need_keys(obj: Any, required: Iterable[str], optional: Iterable[str], what: str) -> dict[str, Any]:
    """``obj`` as a dict with exactly the required keys and none but the optional others."""
    need(obj, dict, what)
    req, opt = set(required), set(optional)
    missing = req - obj.keys()
    if missing:
        raise BundleError(f"{what}: missing {', '.join(clip(k) for k in sorted(missing))}")
    extra = obj.keys() - req - opt
    if extra:
        raise BundleError(f"{what}: unexpected {', '.join(clip(k) for k in sorted(extra))}")
    return dict(obj)


def member(value: Any, allowed: Iterable[str]) -> bool:
    """``value in allowed`` for hostile values (a list is not hashable, a number is no name)."""
    return isinstance(value, str) and value in allowed


def need_name(value: Any, what: str) -> str:
    need(value, str, what)
    if not NAME_RE.match(value):
        raise BundleError(f"{what}: {value[:40]!r} is not a plain table/chain/set name")
    return str(value)


def need_text(value: Any, what: str) -> str:
    need(value, str, what)
    if len(value) > MAX_STRING or _CONTROL_RE.search(value):
        raise BundleError(f"{what}: string too long or with control characters")
    return str(value)


def need_int(value: Any, what: str, low: int = 0, high: int = 2**64 - 1) -> int:
    need(value, int, what)
    if not low <= value <= high:
        raise BundleError(f"{what}: {value} is out of range {low}..{high}")
    return int(value)


def need_list(value: Any, what: str, limit: int = MAX_LIST) -> list[Any]:
    need(value, list, what)
    if len(value) > limit:
        raise BundleError(f"{what}: {len(value)} items, over the limit of {limit}")
    return list(value)


# --- the VM's addresses --------------------------------------------------------------

@lru_cache(maxsize=64)
def _canonical(vm: VmIdentity) -> dict[int, frozenset[str]]:
    """The VM's addresses as the kernel's tools print them: 4 and 6 by IP version, 0 for MACs."""
    ips = [ipaddress.ip_address(a) for a in vm.addresses]
    return {4: frozenset(ip.compressed for ip in ips if ip.version == 4),
            6: frozenset(ip.compressed for ip in ips if ip.version == 6),
            0: frozenset(vm.macs)}


def vm_ip(vm: VmIdentity, text: Any, version: int) -> bool:
    """True when ``text`` is exactly one of the VM's IPv``version`` addresses, in canonical form.

    Canonical form only: a bundle that spells an address another way (leading zeros,
    a zone, upper case) is not proven to mean what the kernel will read. A set lookup,
    because every address literal of a ruleset goes through here.
    """
    return isinstance(text, str) and text in _canonical(vm)[version]


def vm_mac(vm: VmIdentity, text: Any) -> bool:
    """True when ``text`` is one of the VM's MACs, written lower-case with colons."""
    if not isinstance(text, str) or text != text.lower():
        return False
    try:
        return normalize_mac(text) == text and text in vm.macs
    except UsageError:
        return False


def mentions_vm(vm: VmIdentity, text: Any) -> bool:
    """True when a prefix (``10.0.1.0/24``) or range bound covers one of the VM's addresses."""
    if not isinstance(text, str):
        return False
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return any(ipaddress.ip_address(a) in net for a in vm.addresses
               if ipaddress.ip_address(a).version == net.version)


# --- selection ------------------------------------------------------------------------

class Unsupported(Exception):
    """Why a rule cannot be proven to be only the VM's (internal: a reason, or a refusal)."""


@dataclass
class Verdict:
    """What a backend's ``check_rule`` found: is an exact VM address its anchor, where it jumps."""

    anchored: bool = False
    jumps: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)


RuleKey = tuple[Any, int]      # (chain key, index of the rule in its chain)


def select_checked(sizes: Mapping[Any, int], regular: Iterable[Any],
                   verdict: Callable[[RuleKey], Verdict | str], maybe_anchored: Callable[[RuleKey], bool],
                   raw_jumps: Callable[[RuleKey], Iterable[str]],
                   extra: Callable[[RuleKey, Verdict], str | None] | None = None) -> Selection:
    """``select`` over a backend's rules, checked only where it matters.

    ``verdict`` checks one rule (a Verdict, or the reason it cannot travel); it is
    asked only about rules ``maybe_anchored`` flags (a cheap look for the VM's
    address literals) and rules in chains those reach. ``raw_jumps`` reads every
    rule's jumps, supported or not: a chain another rule jumps to is not the VM's,
    whatever that rule is. Jump targets are chain names within the rule's table.
    """
    memo: dict[RuleKey, Verdict | str] = {}

    def checked(r: RuleKey) -> Verdict | str:
        if r not in memo:
            memo[r] = verdict(r)
        return memo[r]

    def anchored(r: RuleKey) -> bool:
        if not maybe_anchored(r):
            return False
        v = checked(r)
        return isinstance(v, Verdict) and v.anchored

    def problem(r: RuleKey) -> str | None:
        v = checked(r)
        if isinstance(v, str):
            return v
        return extra(r, v) if extra else None

    def jumps(r: RuleKey) -> list[Any]:
        return [(*r[0][:-1], t) for t in raw_jumps(r)]

    return select({key: [(key, i) for i in range(n)] for key, n in sizes.items()}, regular,
                  anchored, problem, jumps)


@dataclass
class Selection:
    """The VM's rules (by chain and index), the chains only they reach, what was left out."""

    rules: list[tuple[Any, int]] = field(default_factory=list)
    chains: list[Any] = field(default_factory=list)
    left_out: Counter[str] = field(default_factory=Counter)


def select(chains: Mapping[C, Sequence[R]], regular: Iterable[C], anchored: Callable[[R], bool],
           problem: Callable[[R], str | None], jumps: Callable[[R], Iterable[C]]) -> Selection:
    """The anchored rules that can travel, and the regular chains reached only through them.

    A chain belongs to the VM when every rule jumping to it is one of the VM's (or
    sits in one of the VM's chains) and it is a regular chain (no hook). An
    anchored rule whose jumps reach anything else, or whose reach holds an
    expression ``problem`` names, is left out, with the reason counted.
    """
    regular = set(regular)
    referrers: dict[C, list[tuple[C, int]]] = {}
    for chain, rules in chains.items():
        for i, rule in enumerate(rules):
            for target in jumps(rule):
                referrers.setdefault(target, []).append((chain, i))
    candidates = {(c, i) for c, rules in chains.items() for i, r in enumerate(rules) if anchored(r)}
    left_out: Counter[str] = Counter()

    def reach(start: tuple[C, int]) -> tuple[set[C], str | None]:
        seen: set[C] = set()
        stack = list(jumps(chains[start[0]][start[1]]))
        while stack:
            target = stack.pop()
            if target in seen:
                continue
            seen.add(target)
            if target not in chains:
                return seen, "jumps to a chain that does not exist"
            if target not in regular:
                return seen, "jumps to a base chain"
            for rule in chains[target]:
                why = problem(rule)
                if why:
                    return seen, f"jumps to a chain with {why}"
                stack.extend(jumps(rule))
        return seen, None

    changed = True
    reasons: dict[tuple[C, int], str] = {}
    reached: dict[tuple[C, int], set[C]] = {}
    while changed:
        changed = False
        inside = {t for key in candidates for t in reached.get(key, set())}
        for key in sorted(candidates, key=repr):
            why = problem(chains[key[0]][key[1]])
            seen: set[C] = set()
            if not why:
                seen, why = reach(key)
            if not why:
                reached[key] = seen
                inside_now = inside | seen
                for target in seen:
                    for ref in referrers.get(target, ()):
                        if ref not in candidates and ref[0] not in inside_now:
                            why = "jumps to a chain other rules jump to as well"
                            break
                    if why:
                        break
            if why:
                candidates.discard(key)
                reached.pop(key, None)
                reasons[key] = why
                changed = True
    for why in reasons.values():
        left_out[why] += 1
    vm_chains: list[C] = []
    for key in sorted(candidates, key=lambda k: (repr(k[0]), k[1])):
        for target in sorted(reached.get(key, ()), key=repr):
            if target not in vm_chains:
                vm_chains.append(target)
    mine = [k for k in sorted(candidates, key=lambda k: (repr(k[0]), k[1])) if k[0] not in vm_chains]
    return Selection(mine, vm_chains, left_out)


def context(rules: Sequence[R], index: int, mine: set[int]) -> tuple[R | None, R | None]:
    """The nearest rules before and after ``rules[index]`` that are not the VM's."""
    before = next((rules[j] for j in range(index - 1, -1, -1) if j not in mine), None)
    after = next((rules[j] for j in range(index + 1, len(rules)) if j not in mine), None)
    return before, after


# --- placement -------------------------------------------------------------------------

@dataclass(frozen=True)
class Placed:
    """Where one incoming rule goes: ``exists`` (skip), or before ``existing[position]``."""

    exists: bool
    position: int      # index into the destination's existing rules; len() means append


def place(existing: Sequence[Any], incoming: Sequence[tuple[Any, Any, Any]]) -> list[Placed]:
    """Positions for ``incoming`` rules ``(rule, after, before)`` in a destination chain.

    ``after``/``before`` are the source's nearest other rules around each one (its
    context). A rule already present is skipped. A run of new rules goes right
    after the destination's copy of its ``after`` rule, else right before the copy
    of its ``before`` rule, else at the end of the chain; new rules of one run keep
    their source order and follow any of their run the destination already has.

    >>> place(["a", "z"], [("v", "a", "z")])
    [Placed(exists=False, position=1)]
    """
    out: list[Placed] = []
    position = len(existing)
    run_key: tuple[Any, Any] | None = None
    for rule, after, before in incoming:
        if rule in existing:
            index = existing.index(rule)
            out.append(Placed(True, index))
            position, run_key = index + 1, (after, before)
            continue
        if run_key != (after, before):
            run_key = (after, before)
            if after is not None and after in existing:
                position = existing.index(after) + 1
            elif before is not None and before in existing:
                position = existing.index(before)
            else:
                position = len(existing)
        out.append(Placed(False, position))
    return out


def freeze(value: Any) -> str:
    """A canonical text of JSON data, for comparing rules (``1`` and ``true`` stay apart)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
