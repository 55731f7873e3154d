"""Generic eBPF plumbing: the bcc tc programs (``*.bpf.c`` and their shared headers, package
data), their loader (``loader``) and the bpf(2) map syscalls (``bpfsys``).

What one kind does with its program and maps lives in that kind's package
(``xfer.counters``, ``xfer.dhcp``), above this one.
"""
