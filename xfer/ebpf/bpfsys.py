"""BPF map access through bpf(2): open a pinned map, look up, update, delete, in batches.

This is the pause-window path: it needs neither bcc nor clang, so opening a map
and reading one VM's counters costs microseconds, not the seconds a compile
takes. Programs are compiled and attached by ``xfer.ebpf.loader``; this module
only touches maps. Needs CAP_BPF (or CAP_SYS_ADMIN) and read access to the pin.

    m = BpfMap.open_pinned("/run/xfer/bpf/fw-src/eth1/xfer_ctr")
    keys, values, n = m.dump()          # raw bytes, one batch syscall per ~map size
    m.close()

Keys and values are raw bytes of ``key_size`` / ``value_size``; typed wrappers
(one per map, e.g. ``xfer.counters.maps``) give them meaning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform
import sys
from array import array
from types import TracebackType

from xfer.errors import BPFLoadError, KernelError, PermissionDenied

# bpf(2)'s syscall number differs per architecture.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361,
           "s390x": 351}.get(platform.machine(), 321)
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_GET, OBJ_GET_INFO_BY_FD = 7, 15
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 24, 26, 27
ANY, NOEXIST, EXIST = 0, 1, 2
# Kernels or map types without batch support answer one of these: fall back per key.
_NO_BATCH = {errno.EINVAL, errno.ENOTSUP, 524}  # 524: ENOTSUPP, the kernel-internal one
_FIRST_CHUNK = 4096  # entries asked of the first LOOKUP_BATCH call of a dump


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info`` (the kernel fills what fits)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Call bpf(2); returns its result or ``-errno``."""
    ret = _libc().syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return ret if ret >= 0 else -ctypes.get_errno()


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _c_view(buf: bytearray) -> ctypes.Array[ctypes.c_char]:
    """A ctypes view of a bytearray (no copy; keep it alive while the kernel writes)."""
    return (ctypes.c_char * len(buf)).from_buffer(buf)


def _bytes_addr(data: bytes) -> int:
    """Address of an immutable bytes object's buffer (valid while ``data`` lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class BpfMap:
    """One open BPF map (an fd). Close it, or use it as a context manager."""

    def __init__(self, fd: int, name: str = "") -> None:
        self.fd = fd
        info = map_info(fd)
        self.name = name or info.name.decode()
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.batch_ok = True  # cleared once the kernel says it cannot batch this map

    @classmethod
    def open_pinned(cls, path: str) -> BpfMap:
        """Open a map pinned at ``path`` (BPF_OBJ_GET). Missing pin → BPFLoadError."""
        raw = os.fsencode(path) + b"\0"
        buf = ctypes.create_string_buffer(raw, len(raw))
        fd = _bpf(OBJ_GET, _ObjAttr(pathname=ctypes.addressof(buf)))
        if fd == -errno.ENOENT:
            raise BPFLoadError(f"no BPF map pinned at {path} (is the program attached?)")
        if fd in (-errno.EPERM, -errno.EACCES):
            raise PermissionDenied(f"opening BPF map {path} needs CAP_BPF (run as root)")
        if fd < 0:
            raise KernelError(-fd, f"open BPF map {path}")
        return cls(fd, os.path.basename(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- one element -------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(self.value_size)
        ret = _bpf(MAP_LOOKUP_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v)))
        if ret == -errno.ENOENT:
            return None
        self._check(ret, "lookup")
        return v.raw

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value, self.value_size)
        self._check(_bpf(MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k),
                                                    value=_addr(v), flags=flags)), "update")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        k = ctypes.create_string_buffer(key, self.key_size)
        ret = _bpf(MAP_DELETE_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k)))
        if ret == -errno.ENOENT:
            return False
        self._check(ret, "delete")
        return True

    def keys(self) -> list[bytes]:
        """Every key, one GET_NEXT_KEY syscall each (the fallback walk)."""
        out: list[bytes] = []
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        attr = _ElemAttr(map_fd=self.fd, key=0, value=_addr(nxt))
        while True:
            ret = _bpf(MAP_GET_NEXT_KEY, attr)
            if ret == -errno.ENOENT:
                return out
            self._check(ret, "get next key")
            out.append(nxt.raw)
            ctypes.memmove(cur, nxt, self.key_size)
            attr.key = _addr(cur)

    # --- many elements -----------------------------------------------------------------

    def dump(self, batch: bool = True) -> tuple[bytes, bytes, int]:
        """Every key and value: ``(keys, values, n)``, keys and values concatenated.

        One LOOKUP_BATCH syscall when the map allows it, else a walk of
        GET_NEXT_KEY + LOOKUP per key. An entry deleted during the walk is skipped.
        """
        if batch and self.batch_ok:
            got = self._dump_batch()
            if got is not None:
                return got
        keys, values = [], []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                keys.append(key)
                values.append(value)
        return b"".join(keys), b"".join(values), len(keys)

    def _dump_batch(self) -> tuple[bytes, bytes, int] | None:
        # Chunks start small (an empty map costs a small buffer, not max_entries of
        # them) and grow fourfold per call: 20,000 entries take two calls. Entries
        # land in bytearrays and are copied out once; a single chunk needs no join.
        ks, vs = self.key_size, self.value_size
        # The batch cursor is opaque (a bucket index for hash maps); key_size bytes
        # is what the kernel documents as enough.
        cursor_in = ctypes.create_string_buffer(max(ks, 8))
        cursor_out = ctypes.create_string_buffer(max(ks, 8))
        key_parts: list[bytes] = []
        value_parts: list[bytes] = []
        total = 0
        chunk = max(1, min(self.max_entries, _FIRST_CHUNK))
        first = True
        while True:
            keys, values = bytearray(chunk * ks), bytearray(chunk * vs)
            key_buf, value_buf = _c_view(keys), _c_view(values)
            attr = _BatchAttr(in_batch=0 if first else _addr(cursor_in),
                              out_batch=_addr(cursor_out), keys=_addr(key_buf),
                              values=_addr(value_buf), count=chunk, map_fd=self.fd)
            ret = _bpf(MAP_LOOKUP_BATCH, attr)
            del key_buf, value_buf  # release the bytearrays' buffers before slicing them
            if ret < 0 and -ret in _NO_BATCH and first:
                self.batch_ok = False
                return None
            if ret < 0 and ret != -errno.ENOENT:
                self._check(ret, "batch lookup")
            if attr.count:
                key_parts.append(bytes(memoryview(keys)[:attr.count * ks]))
                value_parts.append(bytes(memoryview(values)[:attr.count * vs]))
                total += attr.count
            if ret == -errno.ENOENT:
                break
            first = False
            ctypes.memmove(cursor_in, cursor_out, len(cursor_out))
            chunk = min(self.max_entries, chunk * 4)
        if len(key_parts) == 1:
            return key_parts[0], value_parts[0], total
        return b"".join(key_parts), b"".join(value_parts), total

    def update_many(self, keys: bytes, values: bytes, batch: bool = True,
                    flags: int = ANY) -> None:
        """Store ``len(keys) // key_size`` entries (keys and values concatenated)."""
        n = len(keys) // self.key_size
        if len(keys) != n * self.key_size or len(values) != n * self.value_size:
            raise ValueError("keys and values do not hold the same number of entries")
        if n == 0:
            return
        if batch and self.batch_ok:
            # The kernel only reads these buffers: point it at the bytes objects, no copy.
            attr = _BatchAttr(keys=_bytes_addr(keys), values=_bytes_addr(values), count=n,
                              map_fd=self.fd, elem_flags=flags)
            ret = _bpf(MAP_UPDATE_BATCH, attr)
            if ret >= 0:
                return
            # The kernel writes count back only once it started; a refusal leaves n.
            stored = 0 if attr.count == n else attr.count
            if -ret not in _NO_BATCH or stored:
                self._check(ret, f"batch update ({stored} of {n} stored)")
            self.batch_ok = False
        ks, vs = self.key_size, self.value_size
        for i in range(n):
            self.update(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs], flags)

    # --- array slots -------------------------------------------------------------------

    def read_slots(self, first: int, n: int, batch: bool = True) -> bytes:
        """The values of array slots ``first`` .. ``first + n - 1``, concatenated.

        One LOOKUP_BATCH (whose cursor is the slot before the first), else a
        lookup per slot. For array maps, whose slots always exist.
        """
        if n <= 0:
            return b""
        if batch and self.batch_ok:
            values = ctypes.create_string_buffer(n * self.value_size)
            keys = ctypes.create_string_buffer(n * 4)
            cursor_in = ctypes.c_uint32(first - 1)
            cursor_out = ctypes.c_uint32()
            attr = _BatchAttr(in_batch=ctypes.addressof(cursor_in) if first else 0,
                              out_batch=ctypes.addressof(cursor_out), keys=_addr(keys),
                              values=_addr(values), count=n, map_fd=self.fd)
            ret = _bpf(MAP_LOOKUP_BATCH, attr)
            if ret >= 0 or (ret == -errno.ENOENT and attr.count == n):
                if attr.count != n:
                    raise KernelError(errno.EIO, f"BPF map {self.name}: batch lookup of "
                                      f"{n} slots returned {attr.count}")
                return values.raw
            if -ret not in _NO_BATCH:
                self._check(ret, "batch lookup")
            self.batch_ok = False
        out = []
        for slot in range(first, first + n):
            value = self.lookup(slot.to_bytes(4, sys.byteorder))
            if value is None:
                raise KernelError(errno.ENOENT, f"BPF map {self.name}: no slot {slot}")
            out.append(value)
        return b"".join(out)

    def write_slots(self, first: int, values: bytes, batch: bool = True) -> None:
        """Store ``values`` (whole slots, concatenated) in array slots from ``first`` on."""
        n = len(values) // self.value_size
        if len(values) != n * self.value_size:
            raise ValueError("values are not a whole number of slots")
        keys = array("I", range(first, first + n)).tobytes()
        self.update_many(keys, values, batch)

    def lookup_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The values of the keys present (the kernel has no batch lookup by key)."""
        out: dict[bytes, bytes] = {}
        k = ctypes.create_string_buffer(self.key_size)
        v = ctypes.create_string_buffer(self.value_size)
        attr = _ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v))
        for key in keys:
            ctypes.memmove(k, key, self.key_size)
            ret = _bpf(MAP_LOOKUP_ELEM, attr)
            if ret == -errno.ENOENT:
                continue
            self._check(ret, "lookup")
            out[key] = v.raw
        return out

    def delete_many(self, keys: list[bytes], batch: bool = True) -> int:
        """Delete the keys that exist; returns how many were deleted."""
        present = list(self.lookup_many(keys))
        if not present:
            return 0
        if batch and self.batch_ok:
            kbuf = ctypes.create_string_buffer(b"".join(present), len(present) * self.key_size)
            attr = _BatchAttr(keys=_addr(kbuf), count=len(present), map_fd=self.fd)
            ret = _bpf(MAP_DELETE_BATCH, attr)
            if ret >= 0 or (-ret not in _NO_BATCH and -ret != errno.ENOENT):
                self._check(ret, "batch delete")
                return attr.count
        return sum(self.delete(key) for key in present)

    def _check(self, ret: int, what: str) -> None:
        if ret < 0:
            raise KernelError(-ret, f"BPF map {self.name}: {what}")


def map_info(fd: int) -> MapInfo:
    """Type, sizes and name of the map behind ``fd``."""
    info = MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    ret = _bpf(OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise KernelError(-ret, "BPF map info")
    return info
