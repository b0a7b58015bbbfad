"""Verify pending migrations on a throwaway branch (cheap: a branch is a copy-on-write snapshot).

Checks: lint (squawk); apply (the pending migrations apply cleanly); idempotent (re-running each
one is a no-op or fails loudly, never a silent change); reversible (with undo files: undo restores
the schema from before, and up -> undo -> up gives the same schema). The branch is deleted
afterwards, also when a check fails or an exception escapes.
"""

from __future__ import annotations

import difflib
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import TierbaseError
from ..provider import find_binaries
from .files import Migration, MigrationDrift, MigrationError, MigrationFailed
from .ledger import LEDGER_SCHEMA, StatementError, apply, run_file, status, undo
from .lint import LintReport, lint

_MAX_DIFF_LINES = 12


class BranchPlatform(Protocol):
    """The part of the tierbase facade verify uses."""

    def create_branch(self, name: str, parent: str | None = ..., *, platform_name: bool = ...) -> Any: ...
    def branch_url(self, name: str, dbname: str = ..., *, direct: bool = ...) -> str: ...
    def delete_branch(self, name: str, recursive: bool = ...) -> Any: ...


@dataclass
class VerifyReport:
    ok: bool
    branch: str
    applied: list[dict[str, Any]]
    problems: list[str]
    lint: LintReport | None
    checks: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "branch": self.branch, "applied": self.applied, "problems": self.problems,
                "warnings": self.warnings, "checks": self.checks,
                "lint": self.lint.to_dict() if self.lint else None}


def verify(platform: BranchPlatform, parent: str, migrations: list[Migration], *, actor: str,
           dbname: str = "postgres", branch_name: str | None = None,
           lint_block: list[str] | None = None) -> VerifyReport:
    """Fork ``parent``, run the checks on the fork, delete the fork; the report says what passed."""
    name = branch_name or f"verify-{secrets.token_hex(3)}"
    report = VerifyReport(ok=False, branch=name, applied=[], problems=[], lint=None, checks={})
    platform.create_branch(name, parent, platform_name=branch_name is None)  # `verify-*` is the platform's
    try:
        url = platform.branch_url(name, dbname, direct=True)
        with psycopg.connect(url, autocommit=True) as conn:
            _checks(conn, url, migrations, actor, lint_block, report)
    except BaseException:
        _delete(platform, name, None)  # the original error is the one to report
        raise
    _delete(platform, name, report)
    report.ok = not report.problems
    return report


def _delete(platform: BranchPlatform, name: str, report: VerifyReport | None) -> None:
    try:
        platform.delete_branch(name, recursive=True)
    except TierbaseError as err:
        if report is not None:
            report.problems.append(f"the verify branch {name} could not be deleted ({err}); "
                                   f"delete it with `tierbase branch delete {name}`")


def _checks(conn: psycopg.Connection[Any], url: str, migrations: list[Migration], actor: str,
            lint_block: list[str] | None, report: VerifyReport) -> None:
    checks = report.checks
    pending = status(conn, migrations).pending
    report.lint = lint(pending, lint_block)
    checks["lint"] = "ok" if report.lint.ok else f"failed: {len(report.lint.blocking)} blocking finding(s)"
    if not report.lint.ok:
        report.problems += [f"lint: {f.location()} {f.rule}: {f.message}" for f in report.lint.blocking]
    if not pending:
        checks.update(apply="ok: nothing pending", idempotent="skipped: nothing pending",
                      reversible="skipped: nothing pending")
        return
    no_undo = [m.label() for m in pending if m.undo_sql is None]
    baseline = schema_dump(url) if not no_undo else ""
    try:
        report.applied = apply(conn, migrations, actor=actor)
    except (MigrationFailed, MigrationDrift, MigrationError) as err:
        checks.update(apply=f"failed: {err.message}", idempotent="skipped: apply failed",
                      reversible="skipped: apply failed")
        report.problems.append(f"apply: {err}")
        return
    checks["apply"] = f"ok: applied {len(report.applied)} migration(s)"
    applied = {int(d["version"]) for d in report.applied}
    fresh = [m for m in migrations if m.version in applied]
    after_up = schema_dump(url) if not no_undo else ""
    _check_idempotent(conn, url, fresh, report)
    if no_undo:
        checks["reversible"] = f"skipped: no undo file for {', '.join(no_undo)}"
    else:
        _check_reversible(conn, url, migrations, fresh, actor, baseline, after_up, report)


# -- idempotency ------------------------------------------------------------------------------------------
def _check_idempotent(conn: psycopg.Connection[Any], url: str, fresh: list[Migration],
                      report: VerifyReport) -> None:
    problems: list[str] = []
    warnings: list[str] = []
    schema_only: list[str] = []
    for m in fresh:
        if m.transactional:
            got = _rerun_in_transaction(conn, url, m)
        else:
            schema_only.append(m.label())
            got = _rerun_autocommit(conn, m)
        if got is None:
            continue
        kind, text = got
        (problems if kind == "changed" else warnings).append(text)
    report.problems += problems
    report.warnings += warnings
    if problems:
        report.checks["idempotent"] = "failed: " + "; ".join(problems)
    else:
        said = ["ok", *warnings]
        if schema_only:
            said.append(f"schema compared, data not, for no-transaction {', '.join(schema_only)}")
        report.checks["idempotent"] = "; ".join(said)


def _rerun_in_transaction(conn: psycopg.Connection[Any], url: str, m: Migration) -> tuple[str, str] | None:
    """Run the file again inside a transaction that is always rolled back; compare schema and data."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL statement_timeout = '5min'")
        before = fingerprint(conn)
        try:
            with conn.transaction():  # a savepoint: an error leaves the outer transaction usable
                run_file(conn, m.sql)
        except StatementError as err:
            return "loud", f"{m.label()} fails loudly on re-run{_at(err)}: {_message(err)}"
        changed = _changed(before, fingerprint(conn))
        changed += _changed_tables(conn, url)
    if changed:
        return "changed", f"{m.label()} is not idempotent: re-running changed {'; '.join(changed)}"
    return None


def _rerun_autocommit(conn: psycopg.Connection[Any], m: Migration) -> tuple[str, str] | None:
    """A no-transaction file (CREATE INDEX CONCURRENTLY) cannot be rolled back: run it for real on the
    throwaway branch and compare the schema."""
    before = fingerprint(conn)
    try:
        run_file(conn, m.sql)
    except StatementError as err:
        return "loud", f"{m.label()} fails loudly on re-run{_at(err)}: {_message(err)}"
    changed = _changed(before, fingerprint(conn))
    if changed:
        return "changed", f"{m.label()} is not idempotent: re-running changed {'; '.join(changed)}"
    return None


def _at(err: StatementError) -> str:
    return f" (line {err.line})" if err.line else ""


def _message(err: StatementError) -> str:
    return err.error.diag.message_primary or str(err.error).strip()


def _changed(before: list[str], after: list[str]) -> list[str]:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    out = [f"schema: + {line}" for line in new] + [f"schema: - {line}" for line in gone]
    return out[:_MAX_DIFF_LINES]


_TOUCHED = """
SELECT schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables
WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 AND schemaname <> '{ledger}' AND schemaname NOT LIKE 'pg_temp%'
ORDER BY 1, 2""".replace("{ledger}", LEDGER_SCHEMA)
_CONTENT = "SELECT count(*), coalesce(sum(hashtextextended((t.*)::text, 0)::numeric), 0) FROM {} AS t"


def _changed_tables(conn: psycopg.Connection[Any], url: str) -> list[str]:
    """Tables the re-run wrote to whose rows now differ from the committed ones (another session
    sees the rows from before, since the re-run is not committed). An UPDATE that rewrites a row
    with the same values is a no-op and passes."""
    touched = conn.execute(_TOUCHED).fetchall()
    if not touched:
        return []
    out: list[str] = []
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SET lock_timeout = '3s'")
        for schema, table, ins, upd, dele in touched:
            query = sql.SQL(_CONTENT).format(sql.Identifier(schema, table))
            now = conn.execute(query).fetchone()
            try:
                was = other.execute(query).fetchone()
            except psycopg.Error as err:  # locked by the re-run's DDL, or a table the re-run created
                if ins or dele:
                    out.append(f"data: {schema}.{table} (+{ins} -{dele} rows; "
                               f"could not compare: {err.diag.message_primary})")
                continue
            if now != was and now is not None and was is not None:
                rows = f"{was[0]} -> {now[0]} rows" if was[0] != now[0] else f"{upd} row(s) updated to new values"
                out.append(f"data: {schema}.{table} ({rows})")
    return out


# -- reversibility --------------------------------------------------------------------------------------
def _check_reversible(conn: psycopg.Connection[Any], url: str, migrations: list[Migration],
                      fresh: list[Migration], actor: str, baseline: str, after_up: str,
                      report: VerifyReport) -> None:
    problems: list[str] = []
    try:
        for m in reversed(fresh):
            undo(conn, m, actor=actor)
    except (MigrationFailed, MigrationError) as err:
        problems.append(f"undo failed: {err}")
    else:
        diff = _diff(baseline, schema_dump(url))
        if diff:
            problems.append("undo does not restore the schema from before the migrations "
                            f"(+ left behind, - not restored): {diff}")
        try:
            apply(conn, migrations, actor=actor)
        except (MigrationFailed, MigrationDrift) as err:
            problems.append(f"re-applying after undo failed: {err}")
        else:
            diff = _diff(after_up, schema_dump(url))
            if diff:
                problems.append(f"up -> undo -> up does not give the same schema as up (- after up, + now): {diff}")
    report.problems += problems
    report.checks["reversible"] = ("failed: " + "; ".join(problems)) if problems else "ok"


def _diff(a: str, b: str) -> str:
    """The changed lines of two schema dumps, compact: '+ CREATE INDEX ... | - ...' ('' when equal)."""
    lines = [f"{line[0]} {line[1:].strip()}"
             for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))
             and line[1:].strip() and not line[1:].lstrip().startswith("--")]  # pg_dump's comment lines
    more = f" | ... ({len(lines) - _MAX_DIFF_LINES} more)" if len(lines) > _MAX_DIFF_LINES else ""
    return " | ".join(lines[:_MAX_DIFF_LINES]) + more


def schema_dump(url: str) -> str:
    """``pg_dump --schema-only`` of the database at ``url``, without owners and the ledger's schema,
    normalised so that two dumps of one schema compare equal."""
    info = conninfo_to_dict(url)
    password = info.pop("password", None)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = str(password)  # not on the command line, where `ps` shows it
    args = [find_binaries()["pg_dump"], "--schema-only", "--no-owner", f"--exclude-schema={LEDGER_SCHEMA}",
            "--dbname", make_conninfo("", **info)]
    try:
        got = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MigrationError(f"pg_dump could not run: {err}", "Check the PostgreSQL client installation") from err
    if got.returncode != 0:
        raise MigrationError(f"pg_dump failed: {got.stderr.strip()}", "Check that the branch's compute is running")
    # \restrict lines carry a random key per run (PostgreSQL 13.22/14.19/15.14/16.10/17.6 and later)
    return "\n".join(line for line in got.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


# -- catalog fingerprint: runs inside a transaction, so it sees the re-run's uncommitted changes -----------
_FINGERPRINT = """
WITH ns AS (
    SELECT oid, nspname, nspacl FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', '{ledger}')
      AND nspname NOT LIKE 'pg_temp_%' AND nspname NOT LIKE 'pg_toast_temp_%')
SELECT format('schema %s acl=%s', n.nspname, n.nspacl) FROM ns n
UNION ALL
SELECT format('relation %s.%s kind=%s persistence=%s rls=%s acl=%s', n.nspname, c.relname, c.relkind,
              c.relpersistence, c.relrowsecurity, c.relacl)
  FROM pg_class c JOIN ns n ON n.oid = c.relnamespace
UNION ALL
SELECT format('column %s.%s.%s %s notnull=%s default=%s identity=%s generated=%s collation=%s',
              n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
              pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attcollation)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN ns n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT format('constraint %s.%s on %s: %s valid=%s', n.nspname, co.conname, co.conrelid::regclass,
              pg_get_constraintdef(co.oid), co.convalidated)
  FROM pg_constraint co JOIN ns n ON n.oid = co.connamespace
UNION ALL
SELECT format('index %s valid=%s', pg_get_indexdef(i.indexrelid), i.indisvalid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN ns n ON n.oid = c.relnamespace
UNION ALL
SELECT format('view %s.%s %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
  FROM pg_class c JOIN ns n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
UNION ALL
SELECT format('function %s.%s(%s) kind=%s returns=%s volatile=%s body=%s', n.nspname, p.proname,
              pg_get_function_identity_arguments(p.oid), p.prokind, pg_get_function_result(p.oid),
              p.provolatile, md5(coalesce(p.prosrc, '')))
  FROM pg_proc p JOIN ns n ON n.oid = p.pronamespace
UNION ALL
SELECT format('trigger %s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN ns n ON n.oid = c.relnamespace
 WHERE NOT t.tgisinternal
UNION ALL
SELECT format('sequence %s.%s %s start=%s inc=%s min=%s max=%s cycle=%s', n.nspname, c.relname,
              format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle)
  FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN ns n ON n.oid = c.relnamespace
UNION ALL
SELECT format('type %s.%s %s base=%s notnull=%s default=%s labels=%s', n.nspname, t.typname, t.typtype,
              format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault,
              (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e
                WHERE e.enumtypid = t.oid))
  FROM pg_type t JOIN ns n ON n.oid = t.typnamespace WHERE t.typtype IN ('e', 'd', 'r')
UNION ALL
SELECT format('policy %s on %s.%s cmd=%s permissive=%s roles=%s using=%s check=%s', p.polname, n.nspname,
              c.relname, p.polcmd, p.polpermissive, p.polroles::text, pg_get_expr(p.polqual, p.polrelid),
              pg_get_expr(p.polwithcheck, p.polrelid))
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN ns n ON n.oid = c.relnamespace
UNION ALL
SELECT format('extension %s %s', e.extname, e.extversion) FROM pg_extension e
ORDER BY 1""".replace("{ledger}", LEDGER_SCHEMA)


def fingerprint(conn: psycopg.Connection[Any]) -> list[str]:
    """One line per schema object (tables, columns, constraints, indexes, views, functions, triggers,
    sequences, types, policies, extensions), outside the system schemas and the ledger's."""
    return [str(row[0]) for row in conn.execute(_FINGERPRINT).fetchall()]
