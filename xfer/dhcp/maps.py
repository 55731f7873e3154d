"""Typed access to the snooper's pinned maps: ctypes keys and values over ``xfer.ebpf.bpfsys``.

``bpfsys`` speaks raw bytes; this wrapper converts to and from the ctypes mirrors
of ``abi`` so the store reads ``value.expires_ns`` instead of slicing bytes.

    with TypedMap("/run/xfer/bpf/sw1/dhcpsnoop/bindings", BindingKey, BindingValue) as m:
        for key, value in m.items():
            ...
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from xfer.ebpf.bpfsys import BpfMap
from xfer.errors import BPFLoadError

K = TypeVar("K")
V = TypeVar("V")


class TypedMap(Generic[K, V]):
    """A pinned map whose keys and values are ctypes types. BPFLoadError when not pinned."""

    def __init__(self, path: str, key_type: type[K], value_type: type[V]) -> None:
        self.key_type = key_type
        self.value_type = value_type
        self.raw = BpfMap.open_pinned(path)
        want = (ctypes.sizeof(key_type), ctypes.sizeof(value_type))  # type: ignore[arg-type]
        if (self.raw.key_size, self.raw.value_size) != want:
            self.raw.close()
            raise BPFLoadError(f"map {path} has key/value sizes {self.raw.key_size}/"
                               f"{self.raw.value_size}, this xfer expects {want[0]}/{want[1]} "
                               "(detach --purge and attach again)")

    def __enter__(self) -> TypedMap[K, V]:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.raw.close()

    def _value(self, data: bytes) -> V:
        return self.value_type.from_buffer_copy(data)  # type: ignore[attr-defined]

    def get(self, key: Any) -> V | None:
        data = self.raw.lookup(bytes(key))
        return None if data is None else self._value(data)

    def put(self, key: Any, value: Any) -> None:
        self.raw.update(bytes(key), bytes(value))

    def delete(self, key: Any) -> bool:
        return self.raw.delete(bytes(key))

    def keys(self) -> Iterator[K]:
        raw_keys = self.raw.keys()   # a list of bytes: BpfMap is not a dict
        for data in raw_keys:
            yield self.key_type.from_buffer_copy(data)  # type: ignore[attr-defined]

    def items(self) -> list[tuple[K, V]]:
        """Every entry, in one batch syscall where the kernel allows it."""
        keys, values, n = self.raw.dump()
        ks, vs = self.raw.key_size, self.raw.value_size
        return [(self.key_type.from_buffer_copy(keys[i * ks:(i + 1) * ks]),  # type: ignore[attr-defined]
                 self._value(values[i * vs:(i + 1) * vs])) for i in range(n)]
