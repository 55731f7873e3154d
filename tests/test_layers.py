"""Imports flow down the layers only, and no modules import each other in a circle.

The layer order below is the one place it is written (docs/architecture.md shows
it). A module may import its own package's modules and anything in a lower
layer; packages sharing a layer (the kinds) are peers and import none of each
other. Every import counts, also the ones inside functions: a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "xfer"

# Lowest first. Each entry: a layer's packages or top-level modules.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("xfer.errors",),
    ("xfer.tomlfile", "xfer.heap", "xfer.pki", "xfer.netns"),
    ("xfer.model",),
    ("xfer.bundle",),
    ("xfer.ebpf",),                                        # kernel-facing, generic
    ("xfer.conntrack", "xfer.dhcp", "xfer.counters", "xfer.rules"),   # the kinds (state)
    ("xfer.transfer",),                                    # export/import/forget across kinds
    ("xfer.net",),                                         # what the daemons share
    ("xfer.agent",),                                       # device
    ("xfer.manager",),                                     # control
    ("xfer.hypervisor",),
    ("xfer.lab",),
    ("xfer.bench",),
    ("xfer.cli",),
)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, the package or module of LAYERS that holds ``module``)."""
    for index, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return index, unit
    raise LookupError(module)


def imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, imported xfer module) of every import in ``module``, resolved to modules."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("xfer") and name != "xfer":
                yield node.lineno, name


def test_every_module_has_a_layer() -> None:
    lost = []
    for m in MODULES:
        if m == "xfer":
            continue
        try:
            unit_of(m)
        except LookupError:
            lost.append(m)
    assert not lost, f"modules in no layer (add them to LAYERS): {lost}"


def test_no_upward_or_sideways_import() -> None:
    wrong = []
    for m in MODULES:
        if m == "xfer":
            continue
        layer, unit = unit_of(m)
        for line, target in imports(m):
            t_layer, t_unit = unit_of(target)
            if t_unit != unit and t_layer >= layer:
                how = "up" if t_layer > layer else "sideways"
                wrong.append(f"{MODULES[m].name}:{line}: {m} -> {target} ({how})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_private_name_from_another_package() -> None:
    # ``from xfer.agent.config import _hostport`` in the manager: a private helper shared by accident.
    wrong = []
    for m, path in MODULES.items():
        if m == "xfer":
            continue
        unit = unit_of(m)[1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xfer"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and unit_of(node.module or "")[1] != unit:
                    wrong.append(f"{path.name}:{node.lineno}: {m} imports {node.module}.{', '.join(private)}")
    assert not wrong, "private names used across packages:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {m: sorted({t for _, t in imports(m) if t != m}) for m in MODULES}
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append([*path[path.index(t):], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, expected", [
    ("from xfer.net import tls\n", ["xfer.net.tls"]),
    ("from xfer.errors import UsageError\n", ["xfer.errors"]),
    ("def f():\n    import xfer.manager.plan\n", ["xfer.manager.plan"]),
])
def test_imports_are_resolved_to_modules(tmp_path: Path, source: str, expected: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker itself: it must see lazy imports and name the submodule, or it passes vacuously.
    fake = tmp_path / "probe.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "xfer.cli.probe", fake)
    assert [t for _, t in imports("xfer.cli.probe")] == expected


def test_an_upward_import_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "probe.py"
    fake.write_text("from xfer.cli.common import app\n")
    monkeypatch.setitem(MODULES, "xfer.net.probe", fake)
    with pytest.raises(AssertionError, match=r"xfer.net.probe -> xfer.cli.common \(up\)"):
        test_no_upward_or_sideways_import()
