"""``xfer vdp serve``: answer 802.1Qbg VDP on a switch's host-facing ports, convert migration hints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xfer.cli.common import JsonOpt, app, log_level
from xfer.cli.manager import MgrCaOpt, MgrCertOpt, MgrKeyOpt

vdp_app = typer.Typer(help="802.1Qbg VDP: the switch side that turns VSI migration hints into "
                           "migration messages.", no_args_is_help=True)
app.add_typer(vdp_app, name="vdp")


@vdp_app.command("serve")
def vdp_serve(
    netns: Annotated[str | None, typer.Option("--netns", help="The switch's namespace (default: the "
                                              "current one).", metavar="NS")] = None,
    ports: Annotated[str, typer.Option("--ports", help="Host-facing ports, comma-separated.",
                                       metavar="P1[,P2...]")] = "",
    server: Annotated[str, typer.Option("--server", help="The server behind these ports, as the "
                                        "manager's topology names it.", metavar="SERVER-ID")] = "",
    manager: Annotated[str | None, typer.Option("--manager", help="The manager's message URL "
                                                "(https: with --ca/--cert/--key).", metavar="URL")] = None,
    ca: MgrCaOpt = None, cert: MgrCertOpt = None, key: MgrKeyOpt = None,
    udp: Annotated[str | None, typer.Option("--udp", help="Send each message as one datagram to "
                                            "ADDR:PORT (unicast or multicast) instead.")] = None,
    interface: Annotated[str | None, typer.Option("--interface", help="With --udp: the local address "
                                                  "datagrams leave from.")] = None,
    inventory: Annotated[Path | None, typer.Option("--inventory", help="VM inventory (default: "
                                                   "$XFER_INVENTORY or /etc/xfer/inventory.toml).")] = None,
    sequence_file: Annotated[Path | None, typer.Option("--sequence-file", help="Keeps the ECP sequence "
                                                       "counter across restarts.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the manager's "
                                           "answer before answering the station with an error.")] = 10.0,
    keep_privileges: Annotated[bool, typer.Option("--keep-privileges", help="Do not drop every "
                                                  "capability once the ports are open.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Answer VDP (ECP ACKs, VDP responses, keep-alives) on PORTS and convert migration hints:
    ASSOCIATE with the M-bit -> "starting"/"in" to SERVER; ASSOCIATE or DEASSOCIATE with the
    S-bit -> "not-running"/"out" from SERVER. The station's answer says whether the manager
    took the message. Runs until SIGTERM; JSON log lines on stderr.

    Example: xfer vdp serve --netns sw1 --ports p1,p2 --server hv7 --udp 10.0.4.9:8701 --json
    """
    import asyncio
    import logging
    import signal

    from xfer.net.log import daemon_logging
    from xfer.vdp.config import VdpConfig, parse_hostport, parse_ports
    from xfer.vdp.link import drop_privileges
    from xfer.vdp.service import VdpService, json_line

    cfg = VdpConfig(netns, parse_ports(ports), server, manager=manager, ca=ca, cert=cert, key=key,
                    udp=parse_hostport(udp) if udp else None, interface=interface, inventory=inventory,
                    sequence_file=sequence_file, timeout_s=timeout)
    daemon_logging(log_level(logging.INFO))

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        async with VdpService(cfg, on_message=json_line if as_json else None):
            if not keep_privileges:
                # The ports are open: what parses frames and answers from here on needs nothing.
                drop_privileges()
            await stopped.wait()

    asyncio.run(main())
