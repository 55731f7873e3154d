"""ctypes mirrors of the structs in ``xfer/ebpf/dhcpsnoop.h``.

tests/test_dhcp_abi.py compares their sizes and offsets with what clang compiles
from the header, so the two sides cannot drift apart silently.

    >>> ctypes.sizeof(BindingKey), ctypes.sizeof(BindingValue)
    (12, 24)
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

ROLE_TRUSTED = 1
ROLE_UNTRUSTED = 2
MODE_ENFORCE = 0
MODE_OBSERVE = 1
FLAG_DHCP = 1
FLAG_STATIC = 2


class Counter(IntEnum):
    """``enum ds_counter``: what each per-port counter counts (see the header)."""

    PASSED = 0
    DROP_SOURCE = 1
    DROP_ARP = 2
    DROP_ROGUE_SERVER = 3
    DROP_CHADDR = 4
    OBSERVED = 5
    BINDING_ADDED = 6
    BINDING_REMOVED = 7
    EXPIRED = 8
    MALFORMED = 9
    ACK_NO_CLIENT = 10
    DHCP_CLIENT = 11
    DROP_PORT_MISMATCH = 12


class BindingKey(ctypes.Structure):
    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16), ("ip", ctypes.c_uint8 * 4)]


class BindingValue(ctypes.Structure):
    _fields_ = [("expires_ns", ctypes.c_uint64), ("ifindex", ctypes.c_uint32),
                ("lease_s", ctypes.c_uint32), ("vlan", ctypes.c_uint16),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5)]


class MacKey(ctypes.Structure):
    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class ClientPort(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("vlan", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class PortCfg(ctypes.Structure):
    _fields_ = [("role", ctypes.c_uint8), ("mode", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class StatKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("counter", ctypes.c_uint32)]


# The IPv4 address travels as 4 raw bytes (network order) rather than a u32, so
# no byte swapping is needed on either side; the C header's __u32 has the same
# size and alignment within the key.
IPv4 = ctypes.c_uint8 * 4
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64

# struct name in the header -> ctypes mirror, for the layout test
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "binding_key": BindingKey, "binding": BindingValue, "mac_key": MacKey,
    "client_port": ClientPort, "port_cfg": PortCfg, "stat_key": StatKey,
}
