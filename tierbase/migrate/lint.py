"""Lint migration files with squawk (PyPI ``squawk-cli``): findings with file and line, and which block.

Transactional migrations are linted with ``--assume-in-transaction`` because tierbase wraps each
in a transaction (so squawk flags CREATE INDEX CONCURRENTLY there, which would fail); files with
``-- tierbase:no-transaction`` are linted as they run, statement by statement.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import TierbaseError
from ..provider import find_binaries
from .files import LintBlocked, LintUnavailable, Migration, MigrationError
from .ledger import transaction_conflicts

#: Rules that block by default: each either takes a lock that stops reads or writes for as long as
#: the table takes to scan or rewrite, or fails outright on a table that already has rows or inside
#: the transaction tierbase opens. Advice-only rules (prefer-*, ban-drop-column for the contract step
#: of expand/contract, renames) are reported but do not block.
DEFAULT_BLOCK: tuple[str, ...] = (
    "syntax-error",
    "adding-required-field",          # ADD COLUMN ... NOT NULL without default: fails on existing rows
    "adding-not-nullable-field",      # SET NOT NULL: full scan under ACCESS EXCLUSIVE
    "adding-field-with-default",      # volatile default: table rewrite (squawk knows the pg version)
    "adding-serial-primary-key-field",  # rewrite + ACCESS EXCLUSIVE while the index builds
    "adding-foreign-key-constraint",  # scan under SHARE ROW EXCLUSIVE on both tables: use NOT VALID
    "constraint-missing-not-valid",   # CHECK/FK validated under lock: add NOT VALID, VALIDATE later
    "disallowed-unique-constraint",   # unique index built under ACCESS EXCLUSIVE
    "changing-column-type",           # rewrite under ACCESS EXCLUSIVE
    "require-concurrent-index-creation",
    "require-concurrent-index-deletion",
    "ban-concurrent-index-creation-in-transaction",  # fails: CONCURRENTLY cannot run in a transaction
    "transaction-nesting",            # BEGIN/COMMIT inside the transaction tierbase opens
    "ban-uncommitted-transaction",
    "ban-drop-database",
)

#: tierbase's own rule (always blocks): a statement that cannot run in the migration's transaction.
OWN_RULE = "tierbase-no-transaction"

#: Left out of squawk's run unless asked for in ``block``: tierbase itself sets statement_timeout and
#: lock_timeout for every migration session, so these would be noise on every file.
DEFAULT_EXCLUDE: tuple[str, ...] = ("require-timeout-settings", "require-statement-timeout", "require-lock-timeout")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int  # 1-based line in the file
    column: int  # 1-based
    rule: str
    level: str  # "warning" | "error"
    message: str
    help: str | None

    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "rule": self.rule,
                "level": self.level, "message": self.message, "help": self.help}


@dataclass
class LintReport:
    findings: list[Finding]
    blocking: list[Finding]
    block_rules: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blocking

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [f.to_dict() for f in self.findings],
                "blocking": [f.to_dict() for f in self.blocking], "block_rules": self.block_rules}

    def require_ok(self) -> None:
        """Raise LintBlocked (a refusal, exit 2) when any finding blocks."""
        if self.ok:
            return
        first = "; ".join(f"{f.location()} {f.rule}" for f in self.blocking[:5])
        raise LintBlocked(
            f"{len(self.blocking)} blocking lint finding(s): {first}",
            "Rewrite the statements as the findings' help says, or configure which squawk rules block",
            **self.to_dict(),
        )


def squawk_binary() -> str:
    found = shutil.which("squawk")
    if found is None:
        raise LintUnavailable("the squawk linter is not installed", "Install it: `pip install squawk-cli`")
    return found


def lint(migrations: list[Migration], block: list[str] | None = None) -> LintReport:
    """Run squawk on the migration files. ``block``: rule names whose findings block (``["*"]``: all);
    default DEFAULT_BLOCK. An error-level finding (a syntax error, a statement that cannot run in the
    migration's transaction) always blocks: the migration would fail anyway."""
    rules = list(DEFAULT_BLOCK) if block is None else list(block)
    every = "*" in rules
    if not migrations:
        return LintReport([], [], rules)
    binary = squawk_binary()
    findings: list[Finding] = []
    with tempfile.TemporaryDirectory(prefix="tierbase-lint-") as tmp:
        on_disk = [_on_disk(m, Path(tmp)) for m in migrations]
        by_path = {str(d.path.resolve()): m for d, m in zip(on_disk, migrations, strict=True)}
        for in_txn in (True, False):
            group = [d for d in on_disk if d.transactional == in_txn]
            if group:
                findings += _run(binary, group, rules, in_txn, by_path)
    findings += _own_findings(migrations)
    findings.sort(key=lambda f: (f.file, f.line, f.column, f.rule))
    blocking = [f for f in findings if every or f.rule in rules or f.level == "error"]
    return LintReport(findings, blocking, rules)


def _on_disk(m: Migration, tmp: Path) -> Migration:
    """squawk reads files: a migration sent over the API is written to a private temp dir for it
    (the server reads no path the client named)."""
    if not m.uploaded:
        return m
    path = tmp / m.path.name
    path.write_text(m.sql)
    return replace(m, path=path)


def _run(binary: str, group: list[Migration], rules: list[str], in_txn: bool,
         by_path: dict[str, Migration]) -> list[Finding]:
    named = [r for r in rules if r not in ("*", "syntax-error")]  # syntax-error is always on
    args = [binary, "--reporter", "json"]
    excluded = [r for r in DEFAULT_EXCLUDE if r not in rules and "*" not in rules]
    if excluded:
        args.append("--exclude=" + ",".join(excluded))
    if named:
        args.append("--include=" + ",".join(named))  # turns opt-in rules on; squawk checks the names
    args.append("--assume-in-transaction" if in_txn else "--no-assume-in-transaction")
    version = _pg_version()
    if version:
        args.append(f"--pg-version={version}")
    args += [str(m.path.resolve()) for m in group]
    try:
        # cwd = the migration dir, so a .squawk.toml in the app repo applies
        got = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=group[0].path.resolve().parent)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MigrationError(f"squawk could not run: {err}", "Check the squawk installation "
                             "(`squawk --version`); reinstall with `pip install squawk-cli`") from err
    if got.returncode not in (0, 1):
        said = got.stderr.strip().splitlines()
        raise MigrationError(f"squawk refused the request: {said[0] if said else got.returncode}",
                             "Check the rule names (https://squawkhq.com/docs/rules)", rules=rules)
    try:
        raw = json.loads(got.stdout or "[]")
    except json.JSONDecodeError as err:
        raise MigrationError(f"squawk's JSON output could not be read: {err}",
                             "Check the squawk version (`squawk --version`; 2.x is supported)") from err
    return [_finding(item, by_path) for item in raw]


def _own_findings(migrations: list[Migration]) -> list[Finding]:
    """What squawk misses (it does not flag a lone CREATE INDEX CONCURRENTLY even when told the file
    runs in a transaction): statements that will fail in the transaction tierbase opens."""
    return [Finding(file=str(m.path), line=line, column=1, rule=OWN_RULE, level="error",
                    message=f"{what} cannot run inside the transaction tierbase runs this migration in",
                    help="Move it to a migration of its own with the line `-- tierbase:no-transaction`")
            for m in migrations if m.transactional for line, what in transaction_conflicts(m.sql)]


def _finding(item: dict[str, Any], by_path: dict[str, Migration]) -> Finding:
    reported = str(item.get("file", ""))
    m = by_path.get(str(Path(reported).resolve()))
    return Finding(
        file=str(m.path) if m else reported,
        # squawk 2.x reports 0-based lines and columns
        line=int(item.get("line", 0)) + 1,
        column=int(item.get("column", 0)) + 1,
        rule=str(item.get("rule_name", "")),
        level=str(item.get("level", "warning")).lower(),
        message=str(item.get("message", "")),
        help=item.get("help"),
    )


def _pg_version() -> str | None:
    try:
        major = find_binaries().major
    except TierbaseError:  # linting must not need a postgres install
        return None
    return f"{major}.0" if major else None
