"""A real Linux guest for the lab, built from Debian packages only, cached by its inputs.

The guest is Debian's cloud kernel (``linux-image-cloud-amd64``, virtio as modules)
and an initramfs holding ``busybox-static``, the eight modules virtio-net needs
and an ``/init`` that takes a DHCP lease on eth0 (udhcpc) and then keeps one TCP
conversation with the server named on the kernel command line: it answers every
line the server sends with ``ack <line>``. It writes what it does to the serial
console as ``XFER-GUEST <event> ...`` lines, which the lab reads.

Packages come through apt (``apt-get download`` + ``dpkg-deb -x``; nothing is
installed on the host). The build is cached under ``/var/cache/xfer-guest/<key>``
where the key hashes the resolved package versions and the guest's own files, so
it is rebuilt only when one of them changes. ``scripts/setup`` calls ``ensure()``.

    guest = ensure()          # Guest(kernel=Path(...), initrd=Path(...), key="...")
    argv = ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", kernel_cmdline("10.0.9.1", 7000)]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xfer.errors import XferError

CACHE = Path(os.environ.get("XFER_GUEST_CACHE", "/var/cache/xfer-guest"))
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# NOTE: Debian's cloud kernel builds virtio as modules; each needs the ones before it
# (busybox insmod does not resolve dependencies).
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "failover", "net_failover", "virtio_net")
MARK = "XFER-GUEST"
BUILDER_VERSION = "1"

INIT = r"""#!/bin/busybox sh
# xfer lab guest: DHCP on eth0, then one TCP conversation that answers each line.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "XFER-GUEST $*" > /dev/console; }
say init
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || say "insmod-failed $m"
done
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        xfer.server=*) server=${arg#xfer.server=} ;;
        xfer.probe=1) say probe-ok; poweroff -f ;;
    esac
done
ip link set lo up
ip link set eth0 up
say "mac $(cat /sys/class/net/eth0/address)"
# -B: broadcast replies, so a relay need not unicast to an address not yet configured.
udhcpc -i eth0 -s /etc/udhcpc.script -B -t 30 -T 1 -n -x hostname:xfer-guest || say dhcp-failed
[ -n "$server" ] || { say no-server; exec sleep 100000; }
host=${server%:*}
port=${server#*:}
# Each connection is one conversation; a cut one is reported, never silently re-opened.
say "connecting $host $port"
# busybox nc takes -e after the address (it runs the rest of the line).
nc "$host" "$port" -e /bin/answer
say "conversation-ended rc=$?"
exec sleep 100000
"""

ANSWER = r"""#!/bin/sh
# stdin/stdout are the TCP connection (busybox nc -e).
echo "XFER-GUEST connected" > /dev/console
while read -r line; do
    echo "ack $line"
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
    deconfig) ip link set "$interface" up ;;
    bound|renew)
        if [ "$(ip -4 addr show dev "$interface" | grep -c "inet $ip/")" = 0 ]; then
            ip -4 addr flush dev "$interface"
            ifconfig "$interface" "$ip" netmask "$subnet" up
            [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        fi
        echo "XFER-GUEST lease $1 $ip ${router%% *}" > /dev/console ;;
esac
"""


class GuestError(XferError):
    """The guest could not be built (a package missing from apt, a tool failing)."""


@dataclass(frozen=True)
class Guest:
    """A built guest: its kernel, its initramfs and the key of its inputs."""

    kernel: Path
    initrd: Path
    key: str


def kernel_cmdline(server: str, port: int, extra: str = "") -> str:
    """The guest's command line: serial console, and the TCP server it talks to.

    >>> kernel_cmdline("10.0.9.1", 7000)
    'console=ttyS0 panic=-1 quiet xfer.server=10.0.9.1:7000'
    """
    return f"console=ttyS0 panic=-1 quiet xfer.server={server}:{port}{' ' + extra if extra else ''}"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def _candidate(package: str) -> str:
    out = _run(["apt-cache", "policy", package])
    found = re.search(r"Candidate:\s*(\S+)", out)
    if not found or found.group(1) == "(none)":
        raise GuestError(f"apt knows no candidate for {package} (run apt-get update)")
    return found.group(1)


def resolve() -> dict[str, str]:
    """The packages the guest is made of, with the versions apt would fetch now.

    The kernel's metapackage names the real image package (``linux-image-6.1.0-N-cloud-amd64``).
    """
    out = _run(["apt-cache", "depends", KERNEL_META])
    image = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not image:
        raise GuestError(f"{KERNEL_META} names no linux-image package")
    return {name: _candidate(name) for name in (image.group(1), BUSYBOX)}


def inputs_key(packages: dict[str, str]) -> str:
    """Hash of everything the build depends on: package versions and the guest's scripts."""
    h = hashlib.sha256()
    h.update(json.dumps({"packages": packages, "modules": MODULES, "builder": BUILDER_VERSION},
                        sort_keys=True).encode())
    for text in (INIT, ANSWER, UDHCPC_SCRIPT):
        h.update(text.encode())
    return h.hexdigest()[:16]


def cached(cache: Path = CACHE) -> Guest | None:
    """A built guest whose key still matches the guest's own files, without asking apt.

    The lab's fast path: the package versions are those recorded in its manifest;
    ``scripts/setup`` (``ensure``) is what notices a newer package.
    """
    if not cache.is_dir():
        return None
    found: list[tuple[float, Guest]] = []
    for entry in cache.iterdir():
        guest = _complete(entry)
        if guest is None:
            continue
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if inputs_key(manifest.get("packages", {})) == entry.name:
            found.append(((entry / "manifest.json").stat().st_mtime, guest))
    return max(found, key=lambda item: item[0])[1] if found else None


def _complete(entry: Path) -> Guest | None:
    kernel, initrd, manifest = entry / "vmlinuz", entry / "initrd.img", entry / "manifest.json"
    if kernel.is_file() and initrd.is_file() and manifest.is_file():
        return Guest(kernel, initrd, entry.name)
    return None


def ensure(cache: Path = CACHE, log: bool = False) -> Guest:
    """Build the guest unless the cache holds one for the current inputs; return it."""
    try:
        packages = resolve()
    except GuestError:
        # A machine whose packages were all installed may never have fetched apt's lists.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        try:
            packages = resolve()
        except GuestError as exc:
            found = cached(cache)
            if found is None:
                raise
            if log:
                print(f"xfer guest: {exc}; using the cached build {found.key}", flush=True)
            return found
    key = inputs_key(packages)
    entry = cache / key
    guest = _complete(entry)
    if guest is not None:
        return guest
    if log:
        print(f"xfer guest: building {key} from {', '.join(f'{k}={v}' for k, v in packages.items())}",
              flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xfer-guest-", dir=cache) as tmp:
        work = Path(tmp)
        built = work / "out"
        built.mkdir()
        _build(packages, work, built)
        (built / "manifest.json").write_text(json.dumps({"key": key, "packages": packages,
                                                         "modules": list(MODULES)}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        built.rename(entry)   # atomic: a half-built guest is never found
    for old in cache.iterdir():
        if old.is_dir() and old.name != key and not old.name.startswith("xfer-guest-"):
            shutil.rmtree(old, ignore_errors=True)
    guest = _complete(entry)
    assert guest is not None
    return guest


def _build(packages: dict[str, str], work: Path, out: Path) -> None:
    debs = work / "debs"
    debs.mkdir()
    # The sandbox user (_apt) cannot write into a root-only temp dir; the files are ours.
    _run(["apt-get", "download", "-o", "APT::Sandbox::User=root",
          *(f"{name}={version}" for name, version in packages.items())], cwd=debs)
    tree = work / "tree"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestError("the kernel package holds no /boot/vmlinuz-*")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[-1], out / "vmlinuz")
    root = work / "root"
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tree / "bin" / "busybox", root / "bin" / "busybox")
    moddir = tree / "lib" / "modules" / version
    for name in MODULES:
        found = list(moddir.rglob(f"{name}.ko"))
        if not found:
            raise GuestError(f"module {name}.ko is not in {version} (compressed or renamed?)")
        shutil.copyfile(found[0], root / "lib" / "modules" / f"{name}.ko")
    for path, text in (("init", INIT), ("bin/answer", ANSWER), ("etc/udhcpc.script", UDHCPC_SCRIPT)):
        (root / path).write_text(text)
    for path in ("init", "bin/busybox", "bin/answer", "etc/udhcpc.script"):
        (root / path).chmod(0o755)
    _cpio(root, out / "initrd.img")


def _cpio(root: Path, target: Path) -> None:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    names = "\n".join([".", *files]) + "\n"
    with open(target, "wb") as f:
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                              input=names.encode(), stdout=f, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise GuestError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    target.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)


def accelerator(guest: Guest, cache: Path = CACHE, timeout_s: float = 4.0) -> str:
    """``kvm`` when a KVM guest boots to its init within ``timeout_s``, else ``tcg``. Cached.

    NOTE: /dev/kvm exists on these machines, but ``-cpu host``/``max`` abort (MSR 0x10a)
    and the default CPU model hangs at boot; only a real boot tells, so probe once per
    host kernel and QEMU version and remember the answer.
    """
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        raise GuestError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = _run([binary, "--version"]).splitlines()[0]
    host = os.uname().release
    memo = cache / f"accel-{hashlib.sha256(f'{host} {qemu} {guest.key}'.encode()).hexdigest()[:12]}"
    if memo.is_file():
        return memo.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="xfer-kvm-probe-") as tmp:
        console = Path(tmp) / "console"
        argv = [binary, "-machine", "pc", "-accel", "kvm", "-m", "128", "-nodefaults",
                "-display", "none", "-no-reboot", "-kernel", str(guest.kernel),
                "-initrd", str(guest.initrd), "-append", "console=ttyS0 panic=-1 quiet xfer.probe=1",
                "-serial", f"file:{console}"]
        # run() kills the hung QEMU when the timeout expires.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
        ok = console.is_file() and f"{MARK} probe-ok" in console.read_text(errors="replace")
    accel = "kvm" if ok else "tcg"
    cache.mkdir(parents=True, exist_ok=True)
    memo.write_text(accel + "\n")
    return accel


def main() -> None:
    """``python -m xfer.lab.guest``: build (or find) the guest; print where it is."""
    guest = ensure(log=True)
    print(f"xfer guest: {guest.kernel.parent} (key {guest.key}, accelerator {accelerator(guest)})")


if __name__ == "__main__":
    main()
