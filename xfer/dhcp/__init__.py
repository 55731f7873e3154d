"""DHCP snooping with IP source guard and ARP inspection, on top of a tc eBPF program.

Modules, top down (none calls one above it)::

    transfer.py  export / import / forget of one VM's bindings (the Kind.DHCP module)
    serve.py     the long-running persister and sweeper (``xfer dhcp serve``)
    device.py    attach (restoring the database into fresh maps), detach, static bindings
    datapath.py  attach and detach the program through xfer.ebpf.loader (bcc, pyroute2; root)
    store.py     the device's binding table: pinned maps + the snooping database file
    maps.py      typed access to the pinned maps over xfer.ebpf.bpfsys (no bcc, no clang)
    persist.py   the snooping-database file format (pure)
    packet.py    DHCP message builder and reference parser (pure; tests and bench)
    model.py     Binding records, lease arithmetic, ownership checks (pure)
    abi.py       ctypes mirrors of xfer/ebpf/dhcpsnoop.h

DHCP is parsed in the datapath (bounded option walk; options 50, 51, 52, 53 read,
at most 64 options, overload never followed), so a DHCPACK's binding exists before
the ACK is forwarded. Design, limits and sizes: docs/dhcp.md.
"""
