"""Benchmark of the rules kind: export + import of one VM's rules, baselines in the same run.

A source firewall holds the lab's stateful ruleset, ``other_rules`` rules for other
hosts and ``vm_rules`` rules for the VM (plus a chain of its own); the destination
holds the same policy and other hosts' rules, without the VM's. Scenarios (each
with ``baseline_s``/``xfer_s``/``ratio`` = baseline / xfer, so above 1 means xfer
is faster):

* ``nft_inprocess``: ``export_section`` + bundle encode/decode + ``import_section``
  (nft backend). Baseline: ``nft -j list ruleset`` at the source and ``nft -j -f`` of
  that file into an empty namespace, the whole-ruleset copy an operator would script
  (it moves every host's rules and the policy, so it is a reference, not the same job).
* ``nft_processes``: ``xfer export --kinds rules`` + ``xfer import`` as processes.
* ``iptables_inprocess``: the same on iptables-legacy firewalls (python-iptables);
  baseline ``iptables-legacy-save | iptables-legacy-restore`` into an empty namespace.

After every xfer run (untimed) the destination must hold exactly the VM's rules
more than before; the import is then taken back with ``forget``.

    run(2000, 20, 11, Path("bench/results/rules.json"), echo=print)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer.bench.common import compile_bytecode, run_process, run_shell, write_results
from xfer.bundle import Bundle
from xfer.errors import XferError
from xfer.lab.hosts import Hosts
from xfer.lab.topology import firewall_ruleset
from xfer.model import Kind, parse_vm
from xfer.rules import transfer

Echo = Callable[[str], None] | None
VM_SPEC = "10.0.1.2,fd00:1::2"


class BenchMismatch(XferError):
    """An import left other rules at the destination than the VM's."""


def _other(i: int) -> str:
    return f"10.{50 + i // 65536}.{i // 256 % 256}.{i % 256}"


def nft_source(other_rules: int, vm_rules: int, with_vm: bool) -> str:
    """The lab's firewall plus table ``hosts``: other hosts' rules, and the VM's when ``with_vm``."""
    lines = [firewall_ruleset(), "table inet hosts {"]
    if with_vm:
        lines += ["  chain vmc {", "    tcp dport 22 accept", "  }"]
    lines += ["  chain forward {", "    type filter hook forward priority filter + 1; policy accept;"]
    lines += [f"    ip daddr {_other(i)} tcp dport 443 ct state new accept" for i in range(other_rules)]
    if with_vm:
        lines += [f"    ip daddr 10.0.1.2 tcp dport {1000 + i} ct state new counter accept"
                  for i in range(vm_rules)]
        lines.append("    ip6 daddr fd00:1::2 jump vmc")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def legacy_source(other_rules: int, vm_rules: int, with_vm: bool) -> str:
    """An iptables-legacy-restore file for the filter table."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":inbound - [0:0]"]
    if with_vm:
        lines.append(":vmc - [0:0]")
    lines += ["-A FORWARD -m conntrack --ctstate INVALID -j DROP",
              "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
              "-A FORWARD -i vm0 -m conntrack --ctstate NEW -j ACCEPT", "-A FORWARD -j inbound"]
    lines += [f"-A inbound -d {_other(i)}/32 -p tcp -m tcp --dport 443 -j ACCEPT" for i in range(other_rules)]
    if with_vm:
        lines += [f"-A inbound -d 10.0.1.2/32 -p tcp -m tcp --dport {1000 + i} -j ACCEPT"
                  for i in range(vm_rules)]
        lines += ["-A inbound -d 10.0.1.2/32 -p udp -j vmc", "-A vmc -p udp -m udp --dport 53 -j ACCEPT"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def _scenario(base: list[float], mine: list[float], note: str, **extra: Any) -> dict[str, Any]:
    b, x = statistics.median(base), statistics.median(mine)
    return {"baseline_s": round(b, 6), "xfer_s": round(x, 6), "ratio": round(b / x, 2),
            "baseline_runs_ms": [round(v * 1e3, 3) for v in base],
            "xfer_runs_ms": [round(v * 1e3, 3) for v in mine], "note": note, **extra}


def _inprocess(src: str, dst: str, backend: str, expected: int,
               repeat: int) -> tuple[list[float], dict[str, Any]]:
    vm = parse_vm(VM_SPEC, {})
    runs: list[float] = []
    export_s: list[float] = []
    meta: dict[str, Any] = {}
    for _ in range(repeat + 1):
        started = time.perf_counter()
        section = transfer.export_section(vm, src, backend=backend)
        data = bundle_mod.encode(Bundle(vm, {"netns": src}, {Kind.RULES: section}))
        exported = time.perf_counter()
        bundle = bundle_mod.decode(data)
        report = transfer.import_section(bundle.sections[Kind.RULES], bundle, dst)
        done = time.perf_counter()
        if report.created != expected:
            raise BenchMismatch(f"import created {report.created} rules, expected {expected}")
        runs.append(done - started)
        export_s.append(exported - started)
        meta = dict(section.meta)
        transfer.forget(vm, dst, backend=backend)
    return runs[1:], {"export_ms": _median_ms(export_s[1:]), "section_meta": meta}


def run(other_rules: int = 2000, vm_rules: int = 20, repeat: int = 11, out: Path | None = None,
        echo: Echo = None) -> dict[str, Any]:
    """Run the scenarios; write ``out`` (JSON) and return the result.

    >>> run(200, 5, 3)["nft_inprocess"]["ratio"] > 1  # doctest: +SKIP
    True
    """
    say = echo or (lambda _: None)
    compile_bytecode()
    result: dict[str, Any] = {"other_rules": other_rules, "vm_rules": vm_rules, "repeat": repeat,
                              "loadavg_before": os.getloadavg()}
    expected = vm_rules + 2          # the VM's rules, its jump, its chain's rule
    with Hosts(f"xbr{os.getpid() % 10000}") as h, tempfile.TemporaryDirectory() as tmp:
        src, dst, scratch = h.add("src"), h.add("dst"), h.add("scratch")
        h.nft(src, nft_source(other_rules, vm_rules, True))
        h.nft(dst, nft_source(other_rules, vm_rules, False))
        runs, extra = _inprocess(src, dst, "nft", expected, repeat)
        dump = Path(tmp) / "ruleset.json"
        base = []
        for _ in range(repeat + 1):
            h.check(scratch, ["nft", "flush", "ruleset"])
            base.append(run_shell(f"ip netns exec {src} nft -j list ruleset > {dump} && "
                                  f"ip netns exec {scratch} nft -j -f {dump}"))
        result["nft_inprocess"] = _scenario(
            base[1:], runs, "xfer: export_section + encode/decode + import_section of the VM's rules; "
            "baseline: nft -j list ruleset + nft -j -f of the whole ruleset into an empty namespace",
            **extra)
        say(f"nft in-process: {_median_ms(runs)} ms (baseline {_median_ms(base[1:])} ms, "
            f"{result['nft_inprocess']['ratio']}x)")

        xfer = [sys.executable, "-m", "xfer.cli"]
        bundle_path = Path(tmp) / "vm.xfer"
        procs = []
        vm = parse_vm(VM_SPEC, {})
        for _ in range(repeat + 1):
            exp_s, _ = run_process([*xfer, "export", "--vm", VM_SPEC, "--kinds", "rules", "--netns", src,
                                    "--out", str(bundle_path)])
            imp_s, _ = run_process([*xfer, "import", str(bundle_path), "--netns", dst])
            procs.append(exp_s + imp_s)
            transfer.forget(vm, dst, backend="nft")
        result["nft_processes"] = _scenario(
            base[1:], procs[1:], "xfer export --kinds rules + xfer import as processes; same baseline")
        say(f"nft processes: {_median_ms(procs[1:])} ms ({result['nft_processes']['ratio']}x)")

        for ns, text in ((src, legacy_source(other_rules, vm_rules, True)),
                         (dst, legacy_source(other_rules, vm_rules, False))):
            h.check(ns, ["nft", "flush", "ruleset"])
            h.check(ns, ["iptables-legacy-restore"], input=text)
        runs, extra = _inprocess(src, dst, "iptables", vm_rules + 2, repeat)
        base = []
        for _ in range(repeat + 1):
            h.run(scratch, ["iptables-legacy", "-F"])
            base.append(run_shell(f"ip netns exec {src} iptables-legacy-save -t filter | "
                                  f"ip netns exec {scratch} iptables-legacy-restore"))
        result["iptables_inprocess"] = _scenario(
            base[1:], runs, "xfer: the same on iptables-legacy (python-iptables); baseline: "
            "iptables-legacy-save | iptables-legacy-restore of the filter table", **extra)
        say(f"iptables in-process: {_median_ms(runs)} ms (baseline {_median_ms(base[1:])} ms, "
            f"{result['iptables_inprocess']['ratio']}x)")
    result["loadavg_after"] = os.getloadavg()
    if out is not None:
        write_results(out, result)
    return result
