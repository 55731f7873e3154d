"""xfer: move a live-migrating VM's dynamic network state between Linux devices.

The kinds of state are ``conntrack`` (netfilter connection tracking),
``dhcp`` (DHCP-snooping bindings kept by a tc/BPF program) and ``counters``
(cumulative per-VM counters kept by a tc/BPF program).
"""

__version__ = "0.1.0"
