"""The facade is composed, not inherited: services with explicit collaborators, wired by ``Tierbase``.

Read from the source (``ast``) and from the constructors' signatures, plus one platform on a
FakeProvider for the views: no root, no postgres, under a second.
"""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tierbase import Tierbase
from tierbase.app_base import Core
from tierbase.errors import PolicyDenied
from tierbase.provider import FakeProvider

from .conftest import free_port_base

PACKAGE = Path(__file__).resolve().parent.parent / "tierbase"
FACADE = sorted(PACKAGE.glob("app*.py"))
#: SQL statement text (a string that starts like a statement); the facade leaves SQL to the layers below
SQL = re.compile(r"""["'](SELECT |INSERT INTO |UPDATE \w+ SET |DELETE FROM |(CREATE|ALTER|DROP) (TABLE|ROLE|INDEX|"""
                 r"""DATABASE|VIEW) |GRANT |REVOKE )""")


def services(tb: Tierbase) -> dict[str, Any]:
    """The services ``tb`` wired: its attributes whose class lives in one of the facade's modules."""
    return {k: v for k, v in vars(tb).items()
            if type(v).__module__.startswith("tierbase.app_") and not isinstance(v, Core)}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tierbase]:
    monkeypatch.setenv("TIERBASE_PORT_BASE", str(free_port_base()))
    monkeypatch.delenv("TIERBASE_FAILPOINTS", raising=False)
    home = Path(tempfile.mkdtemp(prefix="tierbase-facade-")) / "home"
    tb = Tierbase(home, provider=FakeProvider(home))
    tb.init()
    try:
        yield tb
    finally:
        tb.close()
        shutil.rmtree(home.parent, ignore_errors=True)


def test_no_facade_class_inherits_from_another_and_none_casts() -> None:
    for path in FACADE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                # an error class may extend the error root; no service extends anything
                assert not bases or node.name.endswith("Confirmation"), f"{path.name}: {node.name}({bases})"
            if isinstance(node, ast.Call):
                assert ast.unparse(node.func) != "cast", f"{path.name}:{node.lineno} casts"


def test_the_facade_holds_no_sql() -> None:
    for statement in ('"SELECT 1 FROM pg_roles"', "'UPDATE branches SET volume=?'", '"CREATE ROLE {} LOGIN"'):
        assert SQL.search(statement), statement  # the check itself
    assert not SQL.search('"Create a branch from it"')
    found = [f"{p.name}:{n}: {line.strip()}" for p in FACADE for n, line in enumerate(p.read_text().splitlines(), 1)
             if SQL.search(line)]
    assert not found, "SQL text in the facade (it belongs in control/, governance/, migrate/ or compute/):\n" \
                      + "\n".join(found)


def test_each_service_takes_the_core_and_the_services_it_uses_and_the_graph_is_acyclic(tmp_path: Path) -> None:
    tb = Tierbase(tmp_path / "home")  # the wiring needs no data dir until something is asked of it
    wired = services(tb)
    by_class = {type(s).__name__: name for name, s in wired.items()}
    graph: dict[str, set[str]] = {}
    for name, service in wired.items():
        params = list(inspect.signature(type(service)).parameters.values())
        assert params[0].name == "core", f"{type(service).__name__} does not take the core first"
        deps = {by_class[str(p.annotation)] for p in params[1:]}
        assert all(str(p.annotation) in by_class for p in params[1:]), type(service).__name__
        for p in params[1:]:  # given the very service the facade wired, not one of its own
            assert getattr(service, p.name) is wired[by_class[str(p.annotation)]], (name, p.name)
        graph[name] = deps
    done: set[str] = set()
    order = list(wired)  # the facade builds them in dependency order: each needs only earlier ones
    for name in order:
        assert graph[name] <= done, f"{name} is built before {graph[name] - done}"
        done.add(name)
    assert {"governance", "migrations", "workflow", "branch_ops", "rollback_ops", "pitr", "sessions"} <= set(wired)


def test_a_view_shares_the_wires_and_every_service_acts_as_its_principal(fake: Tierbase) -> None:
    fake.create_principal("ana", "developer")
    router = object()
    fake.router = router
    view = fake.as_principal("ana")
    assert view.actor == "ana" and fake.actor is None
    assert view.store is fake.store and view.gate is fake.gate and view.branches is fake.branches
    assert view.router is router  # the service's router reaches every view made from it, and its services
    for name, service in services(view).items():
        core = service.core
        assert core.actor == "ana" and core.wires is fake.core.wires and core.router is router, name
    for service in services(fake).values():
        assert service.core.actor is None
    own = object()
    view.router = own  # a view given a router of its own (a test's switch) keeps it to itself
    assert fake.router is router and all(s.core.router is own for s in services(view).values())


def test_a_view_is_refused_what_its_principal_may_not_do(fake: Tierbase) -> None:
    fake.create_principal("ana", "developer")
    view = fake.as_principal("ana")
    with pytest.raises(PolicyDenied):
        view.delete_branch("production")
    assert fake.store.find("production") is not None
    denied = fake.gate.audit.query(action="branch.delete", target="production")
    assert denied and denied[-1]["actor"] == "ana"
