"""bpf(2) on pinned maps through libc, without bcc.

Listing or changing a few bindings must not pay for bcc's import and clang
(hundreds of milliseconds): export and import run inside the migration's pause
window. This module is the only place that issues map syscalls; it needs
CAP_BPF (root) and a bpffs where the maps are pinned.

    with PinnedMap("/run/xfer/bpf/fw/dhcpsnoop/bindings", BindingKey, BindingValue) as m:
        for key, value in m.items():
            ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from xfer.errors import KernelError, PermissionDenied, XferError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_GET = 7
BPF_ANY, BPF_NOEXIST = 0, 1
_ATTR_SIZE = 128

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

K = TypeVar("K")
V = TypeVar("V")


class MapNotPinned(XferError):
    """No map is pinned at the path (the program was never attached there)."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if ret < 0:
        return -ctypes.get_errno()
    return int(ret)


def _elem_attr(fd: int, key: Any, value: Any, flags: int = 0) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    u64 = ctypes.c_uint64
    ctypes.c_uint32.from_buffer(attr, 0).value = fd
    u64.from_buffer(attr, 8).value = ctypes.addressof(key)
    if value is not None:
        u64.from_buffer(attr, 16).value = ctypes.addressof(value)
    u64.from_buffer(attr, 24).value = flags
    return attr


def obj_get(path: str) -> int:
    """Open a pinned BPF object; returns its fd (close it with os.close)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    ctypes.c_uint64.from_buffer(attr, 0).value = ctypes.addressof(raw)
    fd = _bpf(BPF_OBJ_GET, attr)
    if fd == -errno.ENOENT:
        raise MapNotPinned(f"no BPF map pinned at {path} (is `xfer dhcp attach` done?)")
    if fd in (-errno.EPERM, -errno.EACCES):
        raise PermissionDenied(f"opening {path} needs CAP_BPF (run as root)")
    if fd < 0:
        raise KernelError(-fd, f"BPF_OBJ_GET {path}")
    return fd


class PinnedMap(Generic[K, V]):
    """A pinned map with typed keys and values (ctypes types)."""

    def __init__(self, path: str, key_type: type[K], value_type: type[V]) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.fd = obj_get(path)

    def __enter__(self) -> PinnedMap[K, V]:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def get(self, key: K) -> V | None:
        value = self.value_type()
        err = _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(self.fd, key, value))
        if err == -errno.ENOENT:
            return None
        if err < 0:
            raise KernelError(-err, f"lookup in {self.path}")
        return value

    def put(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        err = _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(self.fd, key, value, flags))
        if err < 0:
            raise KernelError(-err, f"update of {self.path}")

    def delete(self, key: K) -> bool:
        """Delete ``key``; False when it was not there."""
        err = _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(self.fd, key, None))
        if err == -errno.ENOENT:
            return False
        if err < 0:
            raise KernelError(-err, f"delete from {self.path}")
        return True

    def keys(self) -> Iterator[K]:
        # NOTE: BPF_MAP_GET_NEXT_KEY restarts from the first key when the current
        # one was deleted meanwhile; callers collect keys before deleting.
        prev: K | None = None
        while True:
            nxt = self.key_type()
            attr = _elem_attr(self.fd, prev if prev is not None else nxt, nxt)
            if prev is None:
                ctypes.c_uint64.from_buffer(attr, 8).value = 0
            err = _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            if err == -errno.ENOENT:
                return
            if err < 0:
                raise KernelError(-err, f"walk of {self.path}")
            yield nxt
            prev = nxt

    def items(self) -> list[tuple[K, V]]:
        out: list[tuple[K, V]] = []
        for key in list(self.keys()):
            value = self.get(key)
            if value is not None:
                out.append((key, value))
        return out
