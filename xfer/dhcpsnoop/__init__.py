"""DHCP snooping with IP source guard and ARP inspection, on top of a tc eBPF program.

Layers (each calls only the one below)::

    transfer.py  export / import / forget of one VM's bindings (the Kind.DHCP module)
    serve.py     the long-running persister and sweeper (``xfer dhcp serve``)
    store.py     the device's binding table: pinned maps + the persisted file
    datapath.py  compile, load, attach and detach the program (bcc, pyroute2; root)
    bpfsys.py    bpf(2) on pinned maps, without bcc or clang (fast, for every command)
    abi.py       ctypes mirrors of xfer/ebpf/dhcpsnoop.h
    model.py     Binding records, lease arithmetic, ownership checks (pure)
    persist.py   the snooping-database file format (pure)
    packet.py    DHCP message builder and reference parser (pure; tests and bench)

Design and limits: docs/dhcp.md.
"""
