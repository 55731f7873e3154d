"""The ``counters`` kind: per-VM packet, byte and TCP connection counts kept by a tc eBPF
program, carried across a migration. Shaped like ``xfer.conntrack`` and ``xfer.dhcp``;
named as its command (``xfer counters``) and bundle section (``counters``) are.

Modules, top down (none calls one above it)::

    transfer.py  export / import / forget of one VM's counters (the Kind.COUNTERS module)
    device.py    attach and detach the program (xfer.ebpf.loader), find and open its maps
    maps.py      the program's maps, one wrapper each, over xfer.ebpf.bpfsys
    model.py     keys, values, which entries are a VM's, bundle encoding (pure)
    keyjoin.py   exact key matching in bulk with numpy (pure; imported for big blocks only)

The program itself (``counters.bpf.c``, ``xfer_maps.h``) is package data of ``xfer.ebpf``.
"""
