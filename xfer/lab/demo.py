"""`xfer lab demo`: a live TCP conversation survives the move because xfer moved its state.

Run 1 (transfer): VM and server talk through the source firewall; the VM is
paused (SIGSTOP, as a hypervisor stops the guest); its link moves to the
destination firewall; xfer exports the VM's conntrack entries from the source
firewall and imports them into the destination; the VM resumes and the *server*
speaks first. Run 2 (control): the same without the transfer — the destination
firewall drops the server's packets and the conversation is cut.

The destination runs with nf_conntrack_tcp_loose=0 and be_liberal=0 so that
nothing but the transferred entry can let the conversation through.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.lab.topology import SERVICE_IP, VM_IP, VM_IP6, Lab
from xfer.lab.traffic import Peer, conversation_continues
from xfer.model import Kind, parse_vm

PORT = 7000


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _one_run(prefix: str, with_transfer: bool, say: Callable[[str], None]) -> dict[str, Any]:
    steps: dict[str, float] = {}
    result: dict[str, Any] = {"transfer": with_transfer, "steps_ms": steps}
    with Lab(prefix) as lab:
        t = time.perf_counter()
        lab.up()
        steps["lab_up"] = _ms(time.perf_counter() - t)
        for key in ("nf_conntrack_tcp_loose", "nf_conntrack_tcp_be_liberal"):
            lab.hosts.sysctl(lab.fwdst, f"net/netfilter/{key}", "0")
        srv = Peer(lab.hosts, lab.srv, "tcp-listen", str(PORT))
        if not srv.expect("ready"):
            return {**result, "error": "the server did not start"}
        vm = Peer(lab.hosts, lab.vm, "tcp-connect", SERVICE_IP, str(PORT))
        if not (vm.expect("connected") and srv.expect("connected")):
            return {**result, "error": "the VM could not reach the server"}
        for i in range(3):
            vm.send(f"request {i}")
            srv.expect(f"recv request {i}")
            srv.send(f"reply {i}")
            vm.expect(f"recv reply {i}")
        say(f"  VM {VM_IP} ↔ server {SERVICE_IP}:{PORT}: 3 exchanges through {lab.fwsrc}")

        pause_started = time.perf_counter()
        os.killpg(vm.proc.pid, signal.SIGSTOP)  # the hypervisor stops the guest
        t = time.perf_counter()
        lab.move_vm()
        steps["move_link"] = _ms(time.perf_counter() - t)
        if with_transfer:
            ident = parse_vm(f"{VM_IP},{VM_IP6}", {})
            t = time.perf_counter()
            b = transfer.export_bundle(ident, [Kind.CONNTRACK], lab.fwsrc, device=lab.fwsrc)
            data = bundle_mod.encode(b)
            steps["export"] = _ms(time.perf_counter() - t)
            t = time.perf_counter()
            report = transfer.import_bundle(bundle_mod.decode(data), lab.fwdst)
            steps["import"] = _ms(time.perf_counter() - t)
            moved = report.to_dict()
            result["moved"] = {"entries": b.sections[Kind.CONNTRACK].count, "bundle_bytes": len(data),
                               "created": moved["created"], "updated": moved["updated"],
                               "failed": moved["failed"]}
            say(f"  moved {moved['created']} conntrack entries ({len(data)} bytes): "
                f"export {steps['export']} ms, import {steps['import']} ms")
        os.killpg(vm.proc.pid, signal.SIGCONT)
        steps["pause_window"] = _ms(time.perf_counter() - pause_started)

        result["continued"] = conversation_continues(vm, srv, "after-the-move")
    return result


def run(prefix: str = "xfer", echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the demo (transfer, then control); returns what happened and how long it took."""
    say = echo or (lambda _m: None)
    say("run 1: migrate with xfer moving the conntrack state")
    moved = _one_run(prefix, True, say)
    if "error" in moved:
        say(f"demo FAILED: {moved['error']}")
        return {"ok": False, "reason": moved["error"], "with_transfer": moved}
    say(f"  conversation {'CONTINUED' if moved.get('continued') else 'WAS CUT'} "
        f"(pause window {moved['steps_ms'].get('pause_window')} ms)")
    say("run 2 (control): migrate without transferring state")
    control = _one_run(prefix, False, say)
    say(f"  conversation {'CONTINUED' if control.get('continued') else 'WAS CUT'}")
    ok = bool(moved.get("continued")) and control.get("continued") is False
    reason = "" if ok else ("the conversation died despite the transfer" if not moved.get("continued")
                            else "the control survived without transfer: the demo proves nothing")
    say("demo " + ("passed: the connection survived only because xfer moved its state"
                   if ok else f"FAILED: {reason}"))
    return {"ok": ok, "reason": reason, "with_transfer": moved, "control": control}
