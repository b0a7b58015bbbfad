"""Counting, running and fingerprinting an app's tests (pytest).

Counting uses collection only, with a tiny probe plugin that also evaluates
the static skip/xfail marks of every collected test, so that a test skipped
away on a feature branch is seen without running anything. Running parses
the JUnit XML that pytest writes (``--junitxml``), or the summary line of any
other command. Fingerprints are the SHA-256 of a test function's AST (its
decorators included, line numbers and comments left out): a weakened assertion
or an added skip mark changes it, moving the function does not.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInput

PROBE = '''
import json, os

def pytest_collection_finish(session):
    try:
        from _pytest.skipping import evaluate_skip_marks, evaluate_xfail_marks
    except Exception:  # a pytest without them: report no static skips
        evaluate_skip_marks = evaluate_xfail_marks = None
    out = []
    for item in session.items:
        skip = xfail = None
        try:
            if evaluate_skip_marks is not None:
                s = evaluate_skip_marks(item)
                skip = None if s is None else (s.reason or "skipped")
                x = evaluate_xfail_marks(item)
                xfail = None if x is None else (x.reason or "xfail")
        except Exception as err:
            skip = "skip condition could not be evaluated: %s" % err
        out.append({"id": item.nodeid, "skip": skip, "xfail": xfail})
    with open(os.environ["TIERBASE_PROBE_OUT"], "w") as f:
        json.dump(out, f)
'''

_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
TEST_TIMEOUT = 1800


@dataclass
class Collection:
    """What pytest collects in one checkout."""

    tests: dict[str, dict[str, Any]]   # node id -> {"skip": reason|None, "xfail": reason|None}
    ok: bool = True
    output: str = ""

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def inactive(self) -> set[str]:
        """Tests that will not really run: statically skipped or expected to fail."""
        return {t for t, v in self.tests.items() if v.get("skip") is not None or v.get("xfail") is not None}

    def summary(self) -> dict[str, int]:
        return {"total": self.total, "inactive": len(self.inactive)}


@dataclass
class RunResult:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    exit_code: int = 0
    duration_s: float = 0.0
    failures: list[str] = field(default_factory=list)   # ids of failed/errored tests
    output: str = ""
    source: str = "summary"
    junit_xml: str | None = None   # the JUnit report as pytest wrote it (a runner sends it to the platform)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped + self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": self.failed, "skipped": self.skipped, "errors": self.errors,
                "total": self.total, "exit_code": self.exit_code, "duration_s": self.duration_s,
                "failures": self.failures[:50], "counted_from": self.source}


def split_command(command: str) -> list[str]:
    argv = shlex.split(command)
    if not argv:
        raise InvalidInput("the test command is empty", "Set [project] test_command in tierbase.toml")
    return argv


def is_pytest(argv: list[str]) -> bool:
    return any(Path(a).name in ("pytest", "py.test") for a in argv[:3]) or \
        any(argv[i] == "-m" and argv[i + 1] == "pytest" for i in range(len(argv) - 1))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # the kit's own runs must not leave caches behind that would make the worktree dirty
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for var in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def collect(command: str, cwd: Path) -> Collection:
    """Collect (never run) the tests of the checkout at ``cwd`` with the project's pytest command."""
    argv = split_command(command)
    if not is_pytest(argv):
        raise InvalidInput(f"the test command {command!r} does not run pytest, so tests cannot be counted",
                           "Use a pytest command in [project] test_command (e.g. `pytest -q`)")
    with tempfile.TemporaryDirectory(prefix="tierbase-probe-") as tmp:
        (Path(tmp) / "tierbase_probe.py").write_text(PROBE)
        out = Path(tmp) / "collected.json"
        env = _env({"TIERBASE_PROBE_OUT": str(out),
                    "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))})
        got = subprocess.run([*argv, "--collect-only", "-q", "-p", "tierbase_probe", "-p", "no:cacheprovider"],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT)
        text = (got.stdout + got.stderr)[-4000:]
        if not out.exists():
            return Collection({}, ok=got.returncode == 5, output=text)  # 5: pytest found no tests
        tests = {t["id"]: {"skip": t["skip"], "xfail": t["xfail"]} for t in json.loads(out.read_text())}
    return Collection(tests, ok=got.returncode in (0, 5), output=text)


def run(command: str, cwd: Path, database_url: str, select: list[str] | None = None, *,
        user: str | None = None) -> RunResult:
    """Run the test command with DATABASE_URL set; ``select`` narrows a pytest run to those node ids.

    ``user``: run it as that OS user (a CI runner started as root drops to its own user for the tests).
    """
    argv = split_command(command)
    pytest = is_pytest(argv)
    if select and pytest:
        argv = _without_paths(argv, cwd)
    with tempfile.TemporaryDirectory(prefix="tierbase-run-") as tmp:
        if user is not None:
            shutil.chown(tmp, user)
        junit = Path(tmp) / "junit.xml"
        extra = ["--junitxml", str(junit), "-p", "no:cacheprovider", "-o", "junit_family=xunit1"] if pytest else []
        t0 = time.monotonic()
        env = _env({"DATABASE_URL": database_url, **({"HOME": tmp} if user is not None else {})})
        got = subprocess.run([*argv, *extra, *(select or [])], cwd=cwd, capture_output=True, text=True,
                             env=env, timeout=TEST_TIMEOUT, user=user)
        duration = round(time.monotonic() - t0, 2)
        output = got.stdout + got.stderr
        result = parse_junit(junit) if junit.exists() else parse_summary(output)
        result.junit_xml = junit.read_text(errors="replace") if junit.exists() else None
    result.exit_code, result.duration_s, result.output = got.returncode, duration, output[-6000:]
    if got.returncode not in (0, 1, 5) and result.failed + result.errors == 0:
        result.errors += 1  # interrupted, usage error or crash: never green
        result.failures.append(f"(the test command exited {got.returncode})")
    elif not pytest and got.returncode != 0 and result.failed + result.errors == 0:
        result.failed += 1
        result.failures.append(f"(the test command exited {got.returncode})")
    return result


def _without_paths(argv: list[str], cwd: Path) -> list[str]:
    """The command without its test paths, so that a selection runs only what was selected."""
    start = next(i for i, a in enumerate(argv) if Path(a).name in ("pytest", "py.test") or
                 (a == "pytest" and i > 0 and argv[i - 1] == "-m")) + 1
    return argv[:start] + [a for a in argv[start:] if a.startswith("-") or not (cwd / a).exists()]


def parse_junit(path: Path) -> RunResult:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    r = RunResult(source="junit")
    for s in suites:
        tests, failures = int(s.get("tests", 0)), int(s.get("failures", 0))
        errors, skipped = int(s.get("errors", 0)), int(s.get("skipped", 0))
        r.failed += failures
        r.errors += errors
        r.skipped += skipped
        r.passed += tests - failures - errors - skipped
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                r.failures.append(_case_id(case))
    return r


def _case_id(case: ET.Element) -> str:
    """The pytest node id of a JUnit test case (xunit1 records the file)."""
    cls, name, path = case.get("classname", ""), case.get("name", ""), case.get("file")
    if not path:
        return f"{cls}::{name}"
    module = path.removesuffix(".py").replace("/", ".")
    inner = cls[len(module) + 1:] if cls.startswith(module + ".") else ""
    return "::".join([path, *inner.split("."), name] if inner else [path, name])


def parse_summary(output: str) -> RunResult:
    r = RunResult(source="summary")
    for n, what in _SUMMARY.findall(output):
        if what == "passed":
            r.passed = int(n)
        elif what == "failed":
            r.failed = int(n)
        elif what in ("skipped", "xfailed"):
            r.skipped += int(n)
        elif what.startswith("error"):
            r.errors = int(n)
    return r


# -- fingerprints -------------------------------------------------------------------------
def fingerprint(repo: Path, node_id: str) -> str | None:
    """SHA-256 of the test function's AST (None: the test is gone)."""
    try:
        text = (repo / node_id.partition("::")[0]).read_text()
    except (OSError, ValueError):
        return None
    return fingerprint_source(text, node_id)


def fingerprint_source(text: str, node_id: str) -> str | None:
    """The same fingerprint from the test file's text (the platform reads it out of its git mirror)."""
    names = [n.split("[", 1)[0] for n in node_id.partition("::")[2].split("::") if n]
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for name in names:
        node = next((n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                     and n.name == name), None)
        if node is None:
            return None
        body = node.body if isinstance(node, ast.ClassDef) else []
    if node is None or isinstance(node, ast.ClassDef):
        return None
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()
