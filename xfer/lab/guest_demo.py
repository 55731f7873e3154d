"""`xfer lab demo --guest`: a real guest live-migrates under QEMU and its network state follows.

Two guests boot in hv1 (``xfer.lab.guest_lab``), each takes a DHCP lease through
sw1's snooper and answers the server's ticks through fw1. Then, in the same lab:

- vm1 migrates to hv2 with ``xfer qemu-hook`` owning QEMU's pause window: the
  manager moves its conntrack entry (fw1 → fw2), its DHCP binding (sw1 → sw2)
  and its counters (fw1 → fw2) while it runs nowhere. After the switchover the
  server speaks first and the guest answers on the same connection.
- vm2, the control, migrates the same way without xfer: fw2 drops the server's
  packets (``tcp_loose=0``) and sw2 drops the guest as a spoofer.

Prints QEMU's downtime and the guest-visible gap (source STOP → destination
RESUME) of both, and what the pause window cost per kind of state.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xfer.lab.guest_lab import GuestLab, Vm
from xfer.lab.hosts import LabError

CONTINUE_WAIT_S = 20.0   # for the first answer after the switchover (TCP's backoff, a loaded host)
CONTROL_WAIT_S = 4.0     # silence that counts as a cut conversation
DROPS = ("drop_source", "drop_arp", "drop_mac")


def answers_after(lab: GuestLab, vm: Vm, since: float, conn: int, timeout: float) -> float | None:
    """When the server got the first answer to a tick it sent after ``since`` on connection
    ``conn`` (``time.time()``), or None within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = lab.talk(vm)
        sent_after = {ln.n for ln in lines if ln.conn == conn and ln.event == "sent" and ln.ts > since}
        acked = [ln.ts for ln in lines if ln.conn == conn and ln.event == "ack" and ln.n in sent_after]
        if acked:
            return min(acked)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _connection(lab: GuestLab, vm: Vm, acks: int = 3, timeout: float = 20) -> int:
    """The guest's connection once the server has ``acks`` answers on it."""
    deadline = time.monotonic() + timeout
    while True:
        got = [ln for ln in lab.talk(vm) if ln.event == "ack"]
        if len(got) >= acks:
            return got[-1].conn
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.name}: the conversation did not start")
        time.sleep(0.05)


def _pause_cost(hook: dict[str, Any]) -> dict[str, Any]:
    """What the window cost: held in total, the manager's transfer, and per kind of state
    (by the devices' phases: a firewall's phase carries conntrack and counters together).
    ``precopy``: what the manager's "migrating" staged beforehand (conntrack then moves
    as the last delta beside those phases), or None when the window came first."""
    by_kind: dict[str, float] = {}
    precopy = None
    for answer in hook.get("manager", []):
        precopy = answer.get("precopy") or precopy
        for phase in answer.get("phases", []):
            if phase.get("kinds") and phase.get("ms") is not None:
                key = "+".join(sorted(phase["kinds"]))
                by_kind[key] = round(by_kind.get(key, 0.0) + phase["ms"], 3)
    return {"window": hook.get("window_ms"), "transfer": hook.get("transfer_ms"),
            "hook_overhead": hook.get("overhead_ms"), "by_kind": by_kind, "precopy": precopy}


def _drops(counters: dict[str, dict[str, int]], port: str) -> int:
    return sum(counters.get(port, {}).get(k, 0) for k in DROPS)


def run(prefix: str = "xg", echo: Callable[[str], None] | None = print,
        workdir: Path | None = None) -> dict[str, Any]:
    """Run the whole story; the result has the contract's keys plus ``details``."""
    say = echo or (lambda _m: None)
    started = time.monotonic()
    result: dict[str, Any] = {"guest_booted": False, "tcp_continued": False,
                              "dhcp_binding_moved": False, "counters_carried": False,
                              "control_cut": False, "downtime_ms": {}, "guest_gap_ms": {},
                              "pause_cost_ms": {}}
    details: dict[str, Any] = {}
    result["details"] = details
    with tempfile.TemporaryDirectory(prefix=f"xfer-guest-lab-{prefix}-") as tmp:
        work = workdir or Path(tmp)
        # Snooping databases stay in the run's directory (the agents inherit the environment).
        saved = os.environ.get("XFER_DHCP_STATE_DIR")
        os.environ["XFER_DHCP_STATE_DIR"] = str(work / "dhcp")
        try:
            with GuestLab(prefix, work) as lab:
                _story(lab, say, result, details)
        except Exception as exc:   # the report says what failed; the lab is down already
            details["error"] = f"{type(exc).__name__}: {exc}"
            say(f"demo FAILED: {details['error']}")
        finally:
            if saved is None:
                os.environ.pop("XFER_DHCP_STATE_DIR", None)
            else:
                os.environ["XFER_DHCP_STATE_DIR"] = saved
    details["seconds"] = round(time.monotonic() - started, 1)
    checks = ("guest_booted", "tcp_continued", "dhcp_binding_moved", "counters_carried", "control_cut")
    result["ok"] = all(result[k] for k in checks)
    failed = [k for k in checks if not result[k]]
    say(f"demo {'passed' if result['ok'] else 'FAILED: ' + ', '.join(failed)} "
        f"in {details['seconds']} s")
    return result


def _story(lab: GuestLab, say: Callable[[str], None], result: dict[str, Any],
           details: dict[str, Any]) -> None:
    lab.up()
    say(f"lab up: hv1, hv2 (access switches sw1, sw2), fw1, fw2, server; guests under QEMU "
        f"({lab.accel})")
    vms: dict[str, Vm] = {}

    def boot() -> None:
        for name in ("vm1", "vm2"):
            vms[name] = lab.boot(name)

    lab.start_agents(before=boot)
    lab.start_manager()
    say("agents on sw1, sw2, fw1, fw2 (mutual TLS) and the manager are up")
    conns = {}
    for vm in vms.values():
        lab.wait_lease(vm)
        lab.wait_console(vm, "connected")
        conns[vm.name] = _connection(lab, vm)
        say(f"  {vm.name} ({vm.mac}) leased {vm.ip} through sw1's snooper; answering the server "
            f"through fw1")
    result["guest_booted"] = True
    vm1, vm2 = vms["vm1"], vms["vm2"]
    fw1_before = lab.counters("fw1", vm1) or {}
    details["fw1_counters_before"] = fw1_before

    say("vm1 live-migrates hv1 → hv2; xfer qemu-hook owns the pause window")
    fig1 = lab.migrate(vm1, hook=True, on_resume=lambda: lab.point_server_at_destination(vm1))
    hook = fig1.get("hook", {})
    details["with_xfer"] = {k: v for k, v in fig1.items() if k != "hook"}
    details["hook"] = {k: hook.get(k) for k in ("outcome", "status", "error", "window_ms", "transfer_ms",
                                                 "overhead_ms", "downtime_ms")}
    if hook.get("outcome") != "moved":
        raise LabError(f"the hook did not move the state: {hook.get('error') or hook}")
    moved = _pause_cost(hook)["by_kind"]
    say("  the manager moved vm1's state in the window: "
        + ", ".join(f"{kind} ({ms} ms)" for kind, ms in moved.items()))

    say("vm2 (control) live-migrates hv1 → hv2 without xfer")
    fig2 = lab.migrate(vm2, hook=False, on_resume=lambda: lab.point_server_at_destination(vm2))
    details["without_xfer"] = fig2

    first1 = answers_after(lab, vm1, fig1["resume_ts"], conns["vm1"], CONTINUE_WAIT_S)
    first2 = answers_after(lab, vm2, fig2["resume_ts"], conns["vm2"], CONTROL_WAIT_S)
    closed = {vm.name: any(ln.event == "closed" for ln in lab.talk(vm)) for vm in (vm1, vm2)}
    last_before = max((ln.ts for ln in lab.talk(vm1) if ln.event == "ack" and ln.ts <= fig1["stop_ts"]),
                      default=None)
    result["tcp_continued"] = first1 is not None and not closed["vm1"]
    details["conversation_gap_ms"] = {"with_xfer": round((first1 - last_before) * 1000, 1)
                                      if first1 and last_before else None}
    say(f"  vm1: the server spoke first after the switchover and the guest answered "
        f"{round((first1 - fig1['resume_ts']) * 1000)} ms after its resume" if first1 else
        "  vm1: NO answer after the switchover: the conversation died")

    # The manager cleans the source after it answered the hook: wait for that before asking sw1.
    answers = hook.get("manager") or [{}]
    record = lab.wait_outcome(answers[-1].get("migration", -1)) if answers[-1].get("migration") else {}
    details["manager_outcome"] = record.get("outcome")
    sw2 = lab.bindings("sw2")
    sw1 = lab.bindings("sw1")
    snoop = lab.snoop_counters("sw2")
    on_sw2 = {(b["mac"], b["ip"], b["port"]) for b in sw2}
    details["sw2_bindings"], details["sw1_bindings"] = sw2, sw1
    details["sw2_drops"] = {p: _drops(snoop, p) for p in ("tap-vm1", "tap-vm2")}
    # sw2's agent attached the snooper to each destination tap this long after QEMU made it.
    details["snooped_after_ms"] = {p: lab.follow_latency_ms("sw2", p) for p in ("tap-vm1", "tap-vm2")}
    result["dhcp_binding_moved"] = ((vm1.mac, vm1.ip, "tap-vm1") in on_sw2
                                    and not any(b["mac"] == vm1.mac for b in sw1)
                                    and details["sw2_drops"]["tap-vm1"] == 0)
    say(f"  sw2 binds vm1 {vm1.ip} to tap-vm1 (moved, not re-leased): "
        f"{'yes' if result['dhcp_binding_moved'] else 'NO'}; sw2 snooped the new tap "
        f"{details['snooped_after_ms']['tap-vm1']} ms after QEMU created it")

    fw2_vm1, fw2_vm2 = lab.counters("fw2", vm1), lab.counters("fw2", vm2)
    details["fw2_counters"] = {"vm1": fw2_vm1, "vm2": fw2_vm2}
    result["counters_carried"] = bool(
        fw2_vm1 and fw1_before and fw2_vm1["tcp_initiated"] == fw1_before.get("tcp_initiated") == 1
        and all(fw2_vm1[k] >= fw1_before[k] for k in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")))
    say(f"  fw2 counts vm1 from fw1's totals on (fw1 before: {fw1_before.get('tx_packets')} packets out, "
        f"fw2 now: {(fw2_vm1 or {}).get('tx_packets')}; connection opened at fw1 counted: "
        f"{(fw2_vm1 or {}).get('tcp_initiated')})")

    cut = first2 is None
    spoofer = details["sw2_drops"]["tap-vm2"] > 0 and not any(b["mac"] == vm2.mac for b in sw2)
    details["control"] = {"answered": first2 is not None, "sw2_dropped": details["sw2_drops"]["tap-vm2"],
                          "fw2_conntrack": lab.conntrack_has("fw2", vm2)}
    result["control_cut"] = cut and spoofer
    say(f"  vm2 (control): conversation {'CUT' if cut else 'went on (!)'}; sw2 dropped "
        f"{details['sw2_drops']['tap-vm2']} of its packets as a spoofer")

    result["downtime_ms"] = {"with_xfer": fig1.get("downtime_ms"), "without_xfer": fig2.get("downtime_ms")}
    result["guest_gap_ms"] = {"with_xfer": fig1.get("guest_gap_ms"), "without_xfer": fig2.get("guest_gap_ms")}
    cost = _pause_cost(hook)
    if fig1.get("downtime_ms") is not None and fig2.get("downtime_ms") is not None:
        cost["downtime_added"] = fig1["downtime_ms"] - fig2["downtime_ms"]
    result["pause_cost_ms"] = cost
    say(f"QEMU downtime: {fig1.get('downtime_ms')} ms with xfer, {fig2.get('downtime_ms')} ms without; "
        f"guest gap (STOP→RESUME): {fig1.get('guest_gap_ms')} ms with, {fig2.get('guest_gap_ms')} ms without")
    say(f"pause cost: window held {cost['window']} ms (manager {cost['transfer']} ms, hook "
        f"{cost['hook_overhead']} ms); per kind: "
        + ", ".join(f"{k} {v} ms" for k, v in cost["by_kind"].items()))
    if cost["precopy"]:
        say(f"  conntrack was pre-copied while vm1 ran ({cost['precopy']['staged']} entries staged, "
            f"{cost['precopy']['deltas']} deltas); the window carried its last delta")
