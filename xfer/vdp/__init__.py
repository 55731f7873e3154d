"""802.1Qbg VDP, the bridge side: migration hints from hypervisor hosts become migration messages.

    frame.py      ECP header + VDP TLVs: strict decoding, exact encoding (no I/O)
    responder.py  the ECP/VDP state machine: ACKs, responses, retransmission, keep-alives
    sequence.py   the bridge's own ECP sequence numbers, not reused across restarts
    link.py       the raw AF_PACKET sockets on the ports (the only kernel-facing module)
    convert.py    events -> migration messages, and the HTTPS/UDP senders to the manager
    config.py     what a responder needs (CLI flags or an agent's [vdp] section)
    service.py    the daemon: sockets -> responder -> converter, on one event loop

See docs/vdp.md.
"""
