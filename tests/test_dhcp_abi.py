"""The ctypes mirrors match what a C compiler lays out from xfer/ebpf/dhcpsnoop.h.

Cilium checks its Go map types against the compiled C the same way. The BPF
target and x86-64 agree on the alignment of these fixed-width types.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from xfer.dhcp import abi


def _c_layout(tmp: Path) -> dict[str, tuple[int, dict[str, int]]]:
    header = resources.files("xfer.ebpf").joinpath("dhcpsnoop.h")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>",
             f'#include "{header}"', "int main(void) {"]
    for cname, mirror in abi.MIRRORS.items():
        fields = " ".join(f'printf(" {f}=%zu", offsetof(struct {cname}, {f}));'
                          for f, *_ in mirror._fields_)
        lines.append(f'printf("{cname} %zu", sizeof(struct {cname})); {fields} printf("\\n");')
    lines.append("return 0; }")
    src, exe = tmp / "layout.c", tmp / "layout"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        name, size, *pairs = line.split()
        out[name] = (int(size), {k: int(v) for k, v in (p.split("=") for p in pairs)})
    return out


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_mirrors_match_the_header(tmp_path: Path) -> None:
    compiled = _c_layout(tmp_path)
    for cname, mirror in abi.MIRRORS.items():
        size, offsets = compiled[cname]
        assert ctypes.sizeof(mirror) == size, cname
        for field, *_ in mirror._fields_:
            assert getattr(mirror, field).offset == offsets[field], f"{cname}.{field}"


def test_counter_enum_matches_the_header() -> None:
    text = resources.files("xfer.ebpf").joinpath("dhcpsnoop.h").read_text()
    body = text[text.index("enum ds_counter {"):text.index("DS_COUNTER_MAX")]
    names = [re.match(r"\s*DS_(\w+)", line) for line in body.splitlines()[1:]]
    names = [m.group(1) for m in names if m]
    assert names == [c.name for c in abi.Counter]
