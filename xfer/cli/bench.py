"""``xfer bench ...``: benchmarks against the baseline tools, measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xfer.cli.common import (
    JsonOpt,
    app,
    print_json,
    progress,
)
from xfer.errors import UsageError

bench_app = typer.Typer(help="Benchmarks against the baseline tools, measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("conntrack")
def bench_conntrack(
    total: Annotated[int, typer.Option(help="Entries in the source table.")] = 200_000,
    vm_flows: Annotated[int, typer.Option("--vm-flows", help="Of which the VM's.")] = 20_000,
    repeat: Annotated[int, typer.Option(help="Runs of each contender (median reported).")] = 3,
    index: Annotated[bool, typer.Option("--index", help="Also with the pre-copy index (export from "
                                        "the index, in-process and via an agent).")] = False,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/conntrack.json"),
    as_json: JsonOpt = False,
) -> None:
    """Export+import of a VM's conntrack entries vs `conntrack -L ... -o save | conntrack -R -`.

    Example: xfer bench conntrack --total 200000 --vm-flows 20000

    Example: xfer bench conntrack --total 1000000 --vm-flows 20000 --index
    """
    from xfer.bench import conntrack as bench

    with progress("bench conntrack"):
        result = bench.run(total, vm_flows, repeat, out, echo=None if as_json else typer.echo,
                           index=index)
    if as_json:
        print_json(result)


@bench_app.command("precopy")
def bench_precopy(
    total: Annotated[int, typer.Option(help="Entries in the source table.")] = 200_000,
    vm_flows: Annotated[int, typer.Option("--vm-flows", help="Of which the VM's.")] = 20_000,
    churn: Annotated[float, typer.Option(help="Share of the VM's flows changing per round.")] = 0.01,
    repeat: Annotated[int, typer.Option(help="Rounds of each contender (median reported).")] = 5,
    manager: Annotated[bool, typer.Option("--manager/--no-manager", help="Also through a manager and "
                                          "two agents (processes, mutual TLS).")] = True,
    mode: Annotated[str, typer.Option(help="Mode through the manager: relay|pull|push.")] = "relay",
    privsep: Annotated[bool, typer.Option("--privsep", help="Agents separated ([privsep]): their "
                                          "kernel work in their privileged helpers.")] = False,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/precopy.json"),
    as_json: JsonOpt = False,
) -> None:
    """Pause cost with pre-copy (only the last delta in the pause) vs without, same run.

    Example: xfer bench precopy --total 200000 --vm-flows 20000 --churn 0.01

    Example: xfer bench precopy --privsep --out bench/results/precopy-privsep.json
    """
    from xfer.bench import precopy as bench

    result = bench.run(total, vm_flows, churn, repeat, out, echo=None if as_json else typer.echo,
                       manager=manager, mode=mode, privsep=privsep)
    if as_json:
        print_json(result)


@bench_app.command("evacuate")
def bench_evacuate(
    vms: Annotated[int, typer.Option(help="VMs leaving the host at once.")] = 100,
    flows: Annotated[int, typer.Option(help="Conntrack entries per VM.")] = 200,
    total: Annotated[int, typer.Option(help="Entries in the source table (others' included).")] = 0,
    etcd: Annotated[bool, typer.Option(
        "--etcd", help="Also with pre-copy through a manager with its journal on etcd "
        "(a one-member etcd, started for the run).")] = False,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/evacuate.json"),
    as_json: JsonOpt = False,
) -> None:
    """Host evacuation: every VM's message at once through one manager, with and without pre-copy.

    Example: xfer bench evacuate --vms 100 --flows 200

    Example: xfer bench evacuate --vms 100 --flows 200 --etcd
    """
    from xfer.bench import evacuate as bench

    result = bench.run(vms, flows, total, out, echo=None if as_json else typer.echo, etcd=etcd)
    if as_json:
        print_json(result)


@bench_app.command("rules")
def bench_rules(
    other_rules: Annotated[int, typer.Option("--other-rules", help="Other hosts' rules on each "
                                                                   "firewall.")] = 2000,
    vm_rules: Annotated[int, typer.Option("--vm-rules", help="The VM's rules.")] = 20,
    repeat: Annotated[int, typer.Option(help="Runs of each contender (median reported).")] = 11,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/rules.json"),
    as_json: JsonOpt = False,
) -> None:
    """Export+import of a VM's rules (nft, iptables-legacy) vs copying the whole ruleset.

    Baselines in the same run: `nft -j list ruleset` + `nft -j -f`, and
    `iptables-legacy-save | iptables-legacy-restore`.

    Example: xfer bench rules --other-rules 2000 --vm-rules 20 --json
    """
    from xfer.bench import rules as bench

    result = bench.run(other_rules, vm_rules, repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)


@bench_app.command("agents")
def bench_agents(
    vm_flows: Annotated[int, typer.Option("--vm-flows", help="The VM's conntrack entries.")] = 20_000,
    total: Annotated[int, typer.Option(help="Entries in the source table.")] = 20_000,
    repeat: Annotated[int, typer.Option(help="Rounds after the cold one (median reported).")] = 5,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/agents.json"),
    as_json: JsonOpt = False,
) -> None:
    """Push and pull between two agents (mutual TLS) vs in-process export+import, same run.

    Example: xfer bench agents --vm-flows 20000 --json
    """
    from xfer.bench import agents as bench

    with progress("bench agents"):
        result = bench.run(vm_flows, max(total, vm_flows), repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)


@bench_app.command("counters")
def bench_counters(
    vms: Annotated[int, typer.Option("--vms", help="VMs whose counters move in bulk.")] = 10_000,
    repeat: Annotated[int, typer.Option(help="Runs of each contender (median reported).")] = 5,
    seconds: Annotated[float, typer.Option(help="Length of each iperf3 run.")] = 3.0,
    keys_per_vm: Annotated[int, typer.Option("--keys-per-vm", help="2: IPv4 + IPv6 per VM; "
                                             "1: IPv4 only.")] = 2,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/counters.json"),
    datapath: Annotated[bool, typer.Option("--datapath/--no-datapath",
                                           help="Also measure the datapath cost with iperf3.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Counters export+import (batch vs per key) and datapath cost (iperf3 with vs without).

    Example: xfer bench counters --vms 10000 --json
    """
    from xfer.bench import counters as bench

    with progress("bench counters"):
        result = bench.run(vms, repeat, seconds, out, echo=None if as_json else typer.echo,
                           keys_per_vm=keys_per_vm, datapath=datapath)
    if as_json:
        print_json(result)


@bench_app.command("qemu")
def bench_qemu(
    repeat: Annotated[int, typer.Option(help="Migrations of each contender (median reported).")] = 10,
    transfer_ms: Annotated[float, typer.Option("--transfer-ms", help="Time the stand-in manager "
                                               "takes in the second hooked scenario.")] = 50.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Guest memory.")] = 64,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/qemu.json"),
    as_json: JsonOpt = False,
) -> None:
    """Extra guest downtime the QEMU hook causes (window held minus the transfer), real QEMU.

    Baseline: the same migration without the hook, in the same run. Target: under 5 ms.

    Example: xfer bench qemu --repeat 10 --json
    """
    from xfer.bench import qemu as bench

    with progress("bench qemu"):
        result = bench.run(repeat, transfer_ms, out, echo=None if as_json else typer.echo,
                           memory_mb=memory_mb)
    if as_json:
        print_json(result)


@bench_app.command("journal")
def bench_journal(
    sizes: Annotated[str, typer.Option("--sizes", help="Journaled migrations at each level, "
                                       "comma-separated.")] = "0,10000,100000,300000,1000000",
    repeat: Annotated[int, typer.Option(help="Migrations measured at each level (median).")] = 200,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/journal.json"),
    as_json: JsonOpt = False,
) -> None:
    """One migration's journal bookkeeping and recent(100) from 0 to 1M journaled migrations,
    vs the journal before issue 12.5 (same run).

    Example: xfer bench journal --sizes 0,100000,1000000 --repeat 200
    """
    from xfer.bench import journal as bench

    try:
        levels = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated counts, not {sizes!r}") from None
    result = bench.run(levels, repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)


@bench_app.command("etcd")
def bench_etcd(
    count: Annotated[int, typer.Option("--count", help="Migrations through each backend.")] = 200,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/etcd.json"),
    as_json: JsonOpt = False,
) -> None:
    """Migrations through the etcd-backed manager vs the SQLite one (same run, instant agents):
    what the highly available journal costs per migration.

    Example: xfer bench etcd --count 200
    """
    from xfer.bench import journalbackends as bench

    result = bench.run(count, out, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)


@bench_app.command("dhcp")
def bench_dhcp(
    repeat: Annotated[int, typer.Option(help="Runs of each measurement (median reported).")] = 20,
    seconds: Annotated[float, typer.Option(help="Seconds per iperf3 run.")] = 3.0,
    rounds: Annotated[int, typer.Option(help="iperf3 on/off rounds per traffic kind.")] = 4,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/dhcp.json"),
    as_json: JsonOpt = False,
) -> None:
    """ACK-to-enforceable latency, export+import of one binding, iperf3 with guard on vs off.

    Example: xfer bench dhcp --json
    """
    from xfer.bench import dhcp as bench

    with progress("bench dhcp"):
        result = bench.run(repeat, seconds, out, echo=None if as_json else typer.echo,
                           rounds=rounds)
    if as_json:
        print_json(result)


@bench_app.command("migrate")
def bench_migrate(
    flows: Annotated[str, typer.Option("--flows", help="The VM's conntrack entries, one run per "
                                       "comma-separated count.")] = "1000,20000",
    repeat: Annotated[int, typer.Option(help="Rounds after the cold one (median reported).")] = 5,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/migrate.json"),
    as_json: JsonOpt = False,
) -> None:
    """Migration message → every destination committed, each mode and the device-driven variant,
    vs a direct agent push (same run).

    Example: xfer bench migrate --flows 1000,20000 --repeat 5
    """
    from xfer.bench import migrate as bench

    counts = tuple(int(f) for f in flows.split(",") if f.strip())
    with progress("bench migrate"):
        result = bench.run(counts, repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)
