"""Netfilter connection tracking: export, import and forget a VM's entries.

``netlink`` is the only module that opens ctnetlink sockets; ``model`` holds the
readable records; ``transfer`` is the logic, free of sockets.
"""
