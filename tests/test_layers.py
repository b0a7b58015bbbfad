"""The module graph keeps the provider boundary: imports point downward only.

Every import in tierbase/ (top level, inside functions, under TYPE_CHECKING) is read with ``ast``
and checked against the table below. Layers, top to bottom:

    above     everything else: cli, api, service, the facade, workflow, migrate, governance, control
    provider  tierbase.provider: the Protocol, the value types, LocalProvider, FakeProvider, locks
    below     tierbase.storage and tierbase.compute (neither imports the other)
    leaf      errors, procs, failpoints, settings, payloads: importable from anywhere, import nothing of ours

Above reaches the substrate only through the provider package's public face (``tierbase.provider``,
its ``types`` and ``protocol``); below may use the boundary's value types (``provider.types``) and
nothing else above it. No root, no postgres: this runs anywhere in a fraction of a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tierbase"

LEAF = {"tierbase.errors", "tierbase.procs", "tierbase.failpoints", "tierbase.settings", "tierbase.payloads"}
#: what the layers above may import of the provider package
PROVIDER_FACE = {"tierbase.provider", "tierbase.provider.types", "tierbase.provider.protocol"}
#: the boundary's vocabulary, shared with the layers below it
VALUE_TYPES = {"tierbase.provider.types"}

#: imports that break the table today, each with who removes it; the list may only shrink
#: time travel (issue 15) reaches the local substrate itself: History and PointInTime take a
#: LocalProvider (app_pitr refuses other providers). Removed when base snapshots and recovery become
#: provider operations behind Provider.fork(at=).
PITR = "time travel on the local substrate"
KNOWN: dict[tuple[str, str], str] = {
    ("tierbase.control.history", "tierbase.compute.archive"): PITR,
    ("tierbase.control.history", "tierbase.storage"): PITR,
    ("tierbase.pitr", "tierbase.compute.archive"): PITR,
    ("tierbase.pitr", "tierbase.storage"): PITR,
}


def layer(module: str) -> str:
    if module in LEAF:
        return "leaf"
    for below in ("tierbase.storage", "tierbase.compute"):
        if module == below or module.startswith(below + "."):
            return below.rsplit(".", 1)[1]
    if module == "tierbase.provider" or module.startswith("tierbase.provider."):
        return "provider"
    return "above"


def allowed(src: str, dst: str) -> bool:
    """May module ``src`` import module ``dst`` (both tierbase modules)?"""
    a, b = layer(src), layer(dst)
    if b == "leaf":
        return True
    if a == "leaf":
        return False
    if a in ("storage", "compute"):
        return b == a or dst in VALUE_TYPES
    if a == "provider":
        return b in ("provider", "storage", "compute")
    return b == "above" or dst in PROVIDER_FACE  # above


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(module: str, source: str, known: set[str]) -> set[str]:
    """The tierbase modules ``source`` (the text of ``module``) imports, anywhere in it."""
    is_pkg = module in known and any(k.startswith(module + ".") for k in known)
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import postgres` imports a submodule
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m == "tierbase" or m.startswith("tierbase.")}


def bad_imports(module: str, source: str, known: set[str]) -> list[tuple[str, str]]:
    return [(module, dst) for dst in sorted(imports(module, source, known))
            if dst != "tierbase" and not allowed(module, dst)]


def violations() -> list[tuple[str, str]]:
    mods = modules()
    return [v for name, path in mods.items() for v in bad_imports(name, path.read_text(), set(mods))]


def test_every_import_points_down_through_the_provider_boundary() -> None:
    found = violations()
    new = [f"{src} imports {dst} ({layer(src)} -> {layer(dst)})" for src, dst in found if (src, dst) not in KNOWN]
    assert not new, "imports against the layer table (tests/test_layers.py):\n" + "\n".join(new)
    stale = set(KNOWN) - set(found)
    assert not stale, f"fixed, so take them off KNOWN: {sorted(stale)}"


def test_the_boundary_exists_where_the_table_says() -> None:
    mods = modules()
    for name in ("tierbase.provider", "tierbase.provider.protocol", "tierbase.provider.types",
                 "tierbase.provider.local", "tierbase.provider.fake", "tierbase.provider.locks"):
        assert name in mods, name
    assert "tierbase.control.locks" not in mods  # the locks live below the boundary now
    # the control plane is typed against the protocol, not the local provider
    assert "LocalProvider" not in (PACKAGE / "control" / "branches.py").read_text()


@pytest.mark.parametrize(("module", "code", "bad"), [
    ("tierbase.control.branches", "from ..storage.btrfs import BtrfsDriver\n", "tierbase.storage.btrfs"),
    ("tierbase.app", "def f():\n    from .compute import postgres\n", "tierbase.compute.postgres"),
    ("tierbase.service", "from .provider.local import LocalProvider\n", "tierbase.provider.local"),
    ("tierbase.storage.copy", "from ..compute import Postgres\n", "tierbase.compute"),
    ("tierbase.compute.postgres", "from ..control.store import Store\n", "tierbase.control.store"),
    ("tierbase.provider.local", "import tierbase.governance.gate\n", "tierbase.governance.gate"),
    ("tierbase.errors", "from .provider import Endpoint\n", "tierbase.provider"),
])
def test_an_upward_import_is_caught(module: str, code: str, bad: str) -> None:
    """The checker itself: the module's real text with one bad import added fails the table."""
    mods = modules()
    text = mods[module].read_text()
    assert (module, bad) not in bad_imports(module, text, set(mods))
    assert (module, bad) in bad_imports(module, text + "\n" + code, set(mods))


@pytest.mark.parametrize(("src", "dst"), [
    ("tierbase.app_base", "tierbase.provider"),
    ("tierbase.control.branches", "tierbase.provider.protocol"),
    ("tierbase.storage.base", "tierbase.provider.types"),
    ("tierbase.compute.postgres", "tierbase.provider.types"),
    ("tierbase.provider.local", "tierbase.storage.btrfs"),
    ("tierbase.provider.local", "tierbase.compute.postgres"),
    ("tierbase.compute.postgres", "tierbase.errors"),
])
def test_the_table_allows_the_ways_down(src: str, dst: str) -> None:
    assert allowed(src, dst)
