"""What a commit's tests are, read statically from the platform's repository (no code is run).

The ready gate compares a feature commit against the tier's recorded commit:
tests are found the way pytest's defaults and the ini file's
``python_files``/``python_functions``/``python_classes``/``testpaths`` say,
each with the fingerprint of its AST, the dump of each of its assertions and
whether a skip/xfail mark sits on it (or its class, or its module). Files
that steer collection or outcomes (conftest.py, plugins, the ini files, the
declared test command) are the harness: any change to them is reported.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import hashlib
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import Failure
from .gitstore import GitStore
from .testrun import fingerprint_source

INI_FILES = ("pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml")
MARKS = ("skip", "skipif", "xfail")


@dataclass
class Test:
    fingerprint: str
    asserts: list[str]
    inactive: bool


@dataclass
class Inventory:
    tests: dict[str, Test] = field(default_factory=dict)
    harness: dict[str, str] = field(default_factory=dict)   # path (or "test_command") -> sha256
    unparsed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"total": len(self.tests), "inactive": sum(1 for t in self.tests.values() if t.inactive)}


def _ini(store: GitStore, sha: str) -> dict[str, list[str]]:
    """The collection settings of the first ini file pytest would use."""
    for name in INI_FILES:
        text = store.show(sha, name)
        if text is None:
            continue
        opts: dict[str, str] = {}
        if name == "pyproject.toml":
            try:
                opts = {k: " ".join(v) if isinstance(v, list) else str(v) for k, v in
                        tomllib.loads(text).get("tool", {}).get("pytest", {}).get("ini_options", {}).items()}
            except tomllib.TOMLDecodeError:
                continue
            if not opts:
                continue
        else:
            cp = configparser.ConfigParser(interpolation=None)
            try:
                cp.read_string(text)
            except configparser.Error:
                continue
            section = "pytest" if name.endswith("pytest.ini") else "tool:pytest" if name == "setup.cfg" else "pytest"
            if not cp.has_section(section):
                continue
            opts = dict(cp.items(section))
        return {k: v.split() for k, v in opts.items()}
    return {}


def _harness_path(path: str, plugins: set[str]) -> bool:
    base = path.rsplit("/", 1)[-1]
    return base in ("conftest.py", *INI_FILES) or path in plugins


def _plugins(store: GitStore, sha: str, files: list[str]) -> set[str]:
    """Module files named by ``pytest_plugins`` in any conftest.py, or by ``-p`` in addopts."""
    names: set[str] = set()
    for path in files:
        if path.rsplit("/", 1)[-1] != "conftest.py":
            continue
        try:
            tree = ast.parse(store.show(sha, path) or "")
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytest_plugins"
                                                    for t in node.targets):
                with_value = node.value
                if isinstance(with_value, ast.Constant) and isinstance(with_value.value, str):
                    names.add(with_value.value)
                elif isinstance(with_value, ast.List | ast.Tuple):
                    names |= {e.value for e in with_value.elts if isinstance(e, ast.Constant)
                              and isinstance(e.value, str)}
    return {n.replace(".", "/") + ".py" for n in names} | {n.replace(".", "/") + "/__init__.py" for n in names}


def _marked(decorators: list[ast.expr]) -> bool:
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and node.attr in MARKS:
            return True
    return False


def _module_marked(tree: ast.Module) -> bool:
    """``pytestmark = pytest.mark.skip...`` at module level, or a module-level ``pytest.skip(...)``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in node.targets):
            vals = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            if _marked(list(vals)):
                return True
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func
            if isinstance(f, ast.Attribute) and f.attr in ("skip", "importorskip"):
                return True
    return False


def _asserts(fn: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            out.append(ast.dump(node.test))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name.startswith("assert") or name == "raises":
                out.append(ast.dump(node))
    return out


def read(store: GitStore, sha: str, test_command: str) -> Inventory:
    files = store.files(sha)
    ini = _ini(store, sha)
    patterns = ini.get("python_files") or ["test_*.py", "*_test.py"]
    fn_prefix = ini.get("python_functions") or ["test"]
    cls_prefix = ini.get("python_classes") or ["Test"]
    roots = [p.strip("/") for p in ini.get("testpaths", [])]
    inv = Inventory()
    plugins = _plugins(store, sha, files)
    for path in files:
        if _harness_path(path, plugins):
            inv.harness[path] = hashlib.sha256((store.show(sha, path) or "").encode()).hexdigest()
    inv.harness["test_command"] = hashlib.sha256(test_command.encode()).hexdigest()
    for path in files:
        base = path.rsplit("/", 1)[-1]
        if not path.endswith(".py") or not any(fnmatch.fnmatch(base, p) for p in patterns):
            continue
        if roots and not any(path == r or path.startswith(r + "/") for r in roots):
            continue
        try:
            tree = ast.parse(store.show(sha, path) or "")
        except SyntaxError:
            inv.unparsed.append(path)
            continue
        module_off = _module_marked(tree)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _match(node.name, fn_prefix):
                inv.tests[f"{path}::{node.name}"] = _test(node, module_off)
            elif isinstance(node, ast.ClassDef) and _match(node.name, cls_prefix):
                off = module_off or _marked(node.decorator_list)
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and _match(sub.name, fn_prefix):
                        inv.tests[f"{path}::{node.name}::{sub.name}"] = _test(sub, off)
    return inv


def _match(name: str, prefixes: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) if any(c in p for c in "*?[") else name.startswith(p) for p in prefixes)


def _test(node: ast.FunctionDef | ast.AsyncFunctionDef, off: bool) -> Test:
    return Test(hashlib.sha256(ast.dump(node).encode()).hexdigest(), _asserts(node),
                off or _marked(node.decorator_list))


#: the codes a human reviewer's approval of a commit can waive (a lost test never)
WAIVABLE = ("test-weakened", "test-harness-changed", "tests-skipped")


def compare(tier: Inventory, head: Inventory, tier_git: str) -> tuple[dict[str, Any], list[Failure]]:
    """The feature commit's tests against the tier's recorded commit: kept, active, not weakened."""
    failures: list[Failure] = []
    removed = sorted(set(tier.tests) - set(head.tests))
    if removed or len(head.tests) < len(tier.tests):
        failures.append(Failure("fewer-tests", f"the commit has {len(head.tests)} tests, {tier_git}'s recorded "
                                f"commit has {len(tier.tests)}" + (f"; gone: {', '.join(removed[:10])}"
                                                                   if removed else ""),
                                "Restore the deleted tests: the suite may only grow", {"removed": removed}))
    skipped = sorted(t for t, v in head.tests.items() if v.inactive and t in tier.tests
                     and not tier.tests[t].inactive)
    skipped += sorted(t for t, v in head.tests.items() if v.inactive and t not in tier.tests)
    if skipped:
        failures.append(Failure("tests-skipped", f"{len(skipped)} test(s) are skipped or xfail on the commit and "
                                f"were not on {tier_git}: {', '.join(skipped[:10])}",
                                "Remove the skip/xfail marks (or have a human reviewer approve them: "
                                "`tierbase flow approve-tests`)", {"tests": skipped}))
    weakened = []
    for name, old in sorted(tier.tests.items()):
        new = head.tests.get(name)
        if new is None or new.fingerprint == old.fingerprint:
            continue
        lost = Counter(old.asserts) - Counter(new.asserts)  # a changed assertion is a removed one
        if lost or not new.asserts:
            weakened.append(name)
    if weakened:
        failures.append(Failure("test-weakened", f"assertions were removed or replaced in {', '.join(weakened[:10])}",
                                "Restore the assertions (add new ones beside them), or have a human reviewer "
                                "approve the change: `tierbase flow approve-tests`", {"tests": weakened}))
    changed = sorted(p for p in set(tier.harness) | set(head.harness) if tier.harness.get(p) != head.harness.get(p))
    if changed:
        failures.append(Failure("test-harness-changed", f"files that steer test collection or outcomes changed: "
                                f"{', '.join(changed[:10])}",
                                "Revert them, or have a human reviewer approve the change: "
                                "`tierbase flow approve-tests`", {"paths": changed}))
    tests = {"tier": tier.summary(), "head": head.summary(), "removed": removed,
             "added": sorted(set(head.tests) - set(tier.tests)), "skipped_away": skipped, "weakened": weakened,
             "harness_changed": changed}
    return tests, failures


def fingerprint_at(store: GitStore, sha: str, node_id: str) -> str | None:
    """The AST fingerprint of one test at a commit (None: not there), as testrun.fingerprint computes it."""
    text = store.show(sha, node_id.partition("::")[0])
    return None if text is None else fingerprint_source(text, node_id)
