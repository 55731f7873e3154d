"""Per-packet cost of an attached tc program, measured in the kernel with BPF_PROG_TEST_RUN.

iperf3 on a shared two-CPU machine swings by ±15 % from run to run, far more than
a map lookup costs; the kernel's own test runner times one program on one packet a
million times and is steady to a few nanoseconds. Needs root (CAP_BPF, CAP_NET_ADMIN).

    fd = attached_program_fd("sw1", "vm0", prio=0x0d5c)
    ns, verdict = ns_per_run(fd, frame, ifindex=5, namespace="sw1")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import subprocess
from collections.abc import Iterator

from xfer import netns
from xfer.ebpf.bpfsys import SYS_BPF
from xfer.errors import BPFLoadError, KernelError

PROG_TEST_RUN, PROG_GET_FD_BY_ID = 10, 13
TC_ACT_UNSPEC = -1


class _TestRun(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _GetFd(ctypes.Structure):
    _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


# struct __sk_buff up to and including ifindex (offset 40): the fields test_run reads.
_SKB_CTX_SIZE = 192
_SKB_IFINDEX_OFFSET = 40


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ret = int(libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    return ret if ret >= 0 else -ctypes.get_errno()


def attached_program_fd(namespace: str | None, ifname: str, prio: int) -> int:
    """An fd for the tc ingress program at ``prio`` on ``ifname`` (close it with os.close)."""
    # NOTE: pyroute2 does not decode TCA_BPF_ID; tc(8)'s JSON carries the program id.
    argv = ["tc", "-j", "filter", "show", "dev", ifname, "ingress"]
    if namespace:
        argv = ["ip", "netns", "exec", namespace, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    filters = json.loads(proc.stdout or "[]") if proc.returncode == 0 else []
    for f in filters:
        prog_id = f.get("options", {}).get("prog", {}).get("id")
        if f.get("pref") == prio and prog_id:
            fd = _bpf(PROG_GET_FD_BY_ID, _GetFd(prog_id=prog_id))
            if fd < 0:
                raise KernelError(-fd, f"BPF program {prog_id}")
            return fd
    raise BPFLoadError(f"no tc ingress program at priority {prio:#x} on {ifname}")


def ns_per_run(fd: int, frame: bytes, ifindex: int, namespace: str | None,
               repeat: int = 1_000_000) -> tuple[float, int]:
    """(nanoseconds per run, return value) of the program on ``frame`` arriving on ``ifindex``.

    NOTE: test_run resolves the context's ifindex in the caller's namespace, so
    this runs inside ``namespace``.
    """
    data = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    ctx = ctypes.create_string_buffer(_SKB_CTX_SIZE)
    ctypes.c_uint32.from_buffer(ctx, _SKB_IFINDEX_OFFSET).value = ifindex
    attr = _TestRun(prog_fd=fd, data_size_in=len(frame), data_size_out=len(out),
                    data_in=ctypes.addressof(data), data_out=ctypes.addressof(out),
                    repeat=repeat, ctx_size_in=_SKB_CTX_SIZE, ctx_in=ctypes.addressof(ctx))
    with netns.entered(namespace):
        ret = _bpf(PROG_TEST_RUN, attr)
    if ret < 0:
        raise KernelError(-ret, "BPF_PROG_TEST_RUN")
    return float(attr.duration), ctypes.c_int32(attr.retval).value


@contextlib.contextmanager
def trivial_program() -> Iterator[int]:
    """The fd of a tc program that only returns TC_ACT_UNSPEC: the test runner's own cost."""
    from bcc import BPF

    bpf = BPF(text=b"int xfer_pass(struct __sk_buff *skb) { return -1; }")
    try:
        yield int(bpf.load_func(b"xfer_pass", BPF.SCHED_CLS).fd)
    finally:
        bpf.cleanup()
