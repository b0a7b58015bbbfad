"""Migrations: files, the in-branch ledger, squawk lint and verify on throwaway branches (real Postgres)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.migrate import (
    LintBlocked,
    Migration,
    MigrationBusy,
    MigrationDrift,
    MigrationError,
    MigrationFailed,
    MissingUndo,
    apply,
    discover,
    lint,
    new_migration,
    status,
    undo,
    verify,
)

from .conftest import query

ACTOR = "alice"


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def conn(platform: Tierbase, branch: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(platform.branch_url(branch, direct=True), autocommit=True) as c:
        yield c


def tables(conn: psycopg.Connection[Any]) -> set[str]:
    return {str(r[0]) for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def ledger(conn: psycopg.Connection[Any]) -> list[int]:
    return [int(r["version"]) for r in status(conn, []).applied]


# -- files -------------------------------------------------------------------------------------------------
def test_discover_orders_checksums_and_pairs_undo(tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "V0002__add_index.sql": "-- tierbase:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);\n",
        "V0001__create_t.sql": "CREATE TABLE t (a int);\r\n",
        "U0001__create_t.sql": "DROP TABLE t;\n",
        "V10__later.sql": "SELECT 1;\n",
        "README.md": "# migrations\n",
        "seed_data.sql": "INSERT INTO t VALUES (1);\n",
    })
    found = discover(d)
    assert [m.version for m in found] == [1, 2, 10]
    first, second, third = found
    assert first.label() == "V0001__create_t" and first.name == "create_t"
    assert first.checksum == hashlib.sha256(b"CREATE TABLE t (a int);\n").hexdigest()  # CRLF normalised
    assert first.sql == "CREATE TABLE t (a int);\n"
    assert first.undo_path == d / "U0001__create_t.sql" and first.undo_sql == "DROP TABLE t;\n"
    assert first.transactional and not second.transactional
    assert second.undo_path is None and second.undo_sql is None
    assert third.label() == "V0010__later" and third.path.name == "V10__later.sql"


@pytest.mark.parametrize(("files", "said"), [
    ({"V0003__a.sql": "", "V3__b.sql": ""}, "V0003__a.sql, V3__b.sql"),
    ({"V0001__a.sql": "", "V1_b.sql": ""}, "V1_b.sql"),
    ({"V0001__a.sql": "", "v0002__b.sql": ""}, "v0002__b.sql"),
    ({"V0001__a.sql": "", "U0002__b.sql": ""}, "U0002__b.sql"),
    ({"V0001__a.sql": "", "U0001__other.sql": ""}, "U0001__other.sql"),
])
def test_discover_refuses_ambiguous_or_misnamed_files(tmp_path: Path, files: dict[str, str], said: str) -> None:
    with pytest.raises(MigrationError) as caught:
        discover(write(tmp_path / "m", files))
    assert said in caught.value.message and caught.value.hint
    assert caught.value.exit_code == 1


def test_discover_missing_directory_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(MigrationError) as caught:
        discover(tmp_path / "nope")
    assert "does not exist" in caught.value.message
    assert "tierbase migrate new NAME" in caught.value.hint


def test_new_migration_numbers_and_templates(tmp_path: Path) -> None:
    d = tmp_path / "db" / "migrations"
    (first,) = new_migration(d, "create_items")
    assert first.name == "V0001__create_items.sql"
    write(d, {"V0007__manual.sql": "SELECT 1;\n"})
    up, down = new_migration(d, "split_code", with_undo=True)
    assert (up.name, down.name) == ("V0008__split_code.sql", "U0008__split_code.sql")
    found = discover(d)
    assert [m.version for m in found] == [1, 7, 8]
    assert all(m.transactional for m in found)  # the template mentions the marker without enabling it
    assert found[-1].undo_path == down
    for bad in ("Split", "split-code", "", "a b"):
        with pytest.raises(MigrationError):
            new_migration(d, bad)


# -- lint ------------------------------------------------------------------------------------------------------
def test_lint_finds_blocking_index_with_file_and_line(tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "V0001__ok.sql": "-- a comment\nCREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, label text);\n",
        "V0002__index.sql": "-- index labels\n\nCREATE INDEX seed_label_idx ON seed (label);\n",
        "V0003__drop.sql": "ALTER TABLE seed DROP COLUMN IF EXISTS label;\n",
    })
    report = lint(discover(d))
    index = [f for f in report.findings if f.rule == "require-concurrent-index-creation"]
    assert len(index) == 1 and index[0].file == str(d / "V0002__index.sql") and index[0].line == 3
    assert index[0] in report.blocking and not report.ok
    drop = [f for f in report.findings if f.rule == "ban-drop-column"]
    assert drop and drop[0].line == 1 and drop[0] not in report.blocking  # advice, not a block
    assert report.to_dict()["blocking"][0]["line"] == 3
    with pytest.raises(LintBlocked) as caught:
        report.require_ok()
    assert caught.value.exit_code == 2 and "V0002__index.sql:3" in caught.value.message

    assert lint(discover(d), block=[]).ok
    everything = lint(discover(d), block=["*"])
    assert {f.rule for f in everything.blocking} >= {"ban-drop-column", "require-concurrent-index-creation"}
    with pytest.raises(MigrationError):
        lint(discover(d), block=["no-such-rule"])


def test_lint_knows_which_files_run_in_a_transaction(tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "V0001__wrapped.sql": "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON seed (label);\n",
        "V0002__own.sql": "-- tierbase:no-transaction\n"
                          "CREATE INDEX CONCURRENTLY IF NOT EXISTS b_idx ON seed (label);\n",
    })
    report = lint(discover(d))
    rules = {(Path(f.file).name, f.rule) for f in report.blocking}
    assert rules == {("V0001__wrapped.sql", "tierbase-no-transaction")}
    d = write(tmp_path / "m2", {"V0001__two.sql": "CREATE TABLE IF NOT EXISTS two (id bigint);\n"
                                                  "CREATE INDEX CONCURRENTLY IF NOT EXISTS two_idx ON two (id);\n"})
    at = {(f.line, f.rule) for f in lint(discover(d)).blocking}
    assert (2, "tierbase-no-transaction") in at
    assert (2, "ban-concurrent-index-creation-in-transaction") in at


def test_lint_reports_syntax_errors_as_blocking(tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__bad.sql": "SELECT 1;\nCREATE TABLE x (id int;\n"})
    report = lint(discover(d), block=[])
    assert [(f.rule, f.line, f.level) for f in report.blocking] == [("syntax-error", 2, "error")]


# -- apply ----------------------------------------------------------------------------------------------------
def test_apply_records_ledger_and_reapply_is_noop(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {
        "V0001__items.sql": "CREATE TABLE items (id bigint PRIMARY KEY, code text);\n",
        "V0002__fill.sql": "INSERT INTO items SELECT id, label FROM seed WHERE id <= 10;\n",
    })
    migrations = discover(d)
    before = status(conn, migrations)
    assert [m.version for m in before.pending] == [1, 2] and before.applied == []

    done = apply(conn, migrations, actor=ACTOR)
    assert [(r["version"], r["name"]) for r in done] == [(1, "items"), (2, "fill")]
    assert all(r["checksum"] == m.checksum and r["duration_ms"] >= 0 for r, m in zip(done, migrations, strict=True))
    after = status(conn, migrations)
    assert after.pending == [] and after.drift == [] and after.missing == []
    assert [(r["version"], r["applied_by"]) for r in after.applied] == [(1, ACTOR), (2, ACTOR)]
    assert after.to_dict()["current_version"] == 2
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)

    assert apply(conn, migrations, actor=ACTOR) == []  # nothing pending: nothing runs again
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)

    write(d, {"V0003__more.sql": "ALTER TABLE items ADD COLUMN IF NOT EXISTS note text;\n"})
    (d / "V0001__items.sql").rename(d / "V0001__items_renamed.sql.bak")  # gone from disk: "missing"
    now = discover(d)
    st = status(conn, now)
    assert [m.version for m in st.pending] == [3] and [r["version"] for r in st.missing] == [1]
    assert [r["version"] for r in apply(conn, now, actor=ACTOR)] == [3]


def test_apply_up_to_a_target_version(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {f"V000{i}__t{i}.sql": f"CREATE TABLE t{i} (id int);\n" for i in (1, 2, 3)})
    assert [r["version"] for r in apply(conn, discover(d), actor=ACTOR, target_version=2)] == [1, 2]
    assert {"t1", "t2"} <= tables(conn) and "t3" not in tables(conn)


def test_edited_applied_migration_is_refused(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "CREATE TABLE drift_a (id int);\n"})
    apply(conn, discover(d), actor=ACTOR)
    write(d, {"V0001__a.sql": "CREATE TABLE drift_a (id int, extra text);\n",
              "V0002__b.sql": "CREATE TABLE drift_b (id int);\n"})
    migrations = discover(d)
    st = status(conn, migrations)
    assert [m.version for m, _ in st.drift] == [1]
    assert st.to_dict()["drift"][0]["file_checksum"] == migrations[0].checksum
    with pytest.raises(MigrationDrift) as caught:
        apply(conn, migrations, actor=ACTOR)
    assert caught.value.exit_code == 2 and "V0001__a" in caught.value.message
    assert caught.value.data["drift"][0]["version"] == 1
    assert "drift_b" not in tables(conn) and ledger(conn) == [1]


def test_syntax_error_fails_with_line_and_leaves_the_migration_out(tmp_path: Path,
                                                                   conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {
        "V0001__good.sql": "CREATE TABLE good (id int);\n",
        "V0002__bad.sql": "CREATE TABLE half (id int);\n\n-- then a typo\nCREATE TABLE other (id int;\n",
        "V0003__never.sql": "CREATE TABLE never (id int);\n",
    })
    with pytest.raises(MigrationFailed) as caught:
        apply(conn, discover(d), actor=ACTOR)
    err = caught.value
    assert err.exit_code == 1
    assert err.data["version"] == 2 and err.data["line"] == 4 and err.data["sqlstate"] == "42601"
    assert err.data["file"].endswith("V0002__bad.sql") and err.data["applied"] == [1]
    assert "line 4" in err.message and "V0001__good was applied before it and stays applied" in err.hint
    assert "Nothing of V0002__bad was applied" in err.hint
    assert tables(conn) >= {"good"} and not tables(conn) & {"half", "other", "never"}
    assert ledger(conn) == [1]


def test_error_in_a_later_statement_points_at_its_line(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__ref.sql": "CREATE TABLE ref_a (id int);\n"
                                                "INSERT INTO ref_a\n  SELECT no_such_column FROM seed;\n"})
    with pytest.raises(MigrationFailed) as caught:
        apply(conn, discover(d), actor=ACTOR)
    assert caught.value.data["line"] == 3 and caught.value.data["sqlstate"] == "42703"
    assert "ref_a" not in tables(conn) and ledger(conn) == []


def test_constraint_violated_by_existing_rows_fails_unchanged(tmp_path: Path,
                                                              conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__small_ids.sql": "CREATE TABLE audit_x (id int);\n"
                                                      "ALTER TABLE seed ADD CONSTRAINT small_ids CHECK (id < 10);\n"})
    with pytest.raises(MigrationFailed) as caught:
        apply(conn, discover(d), actor=ACTOR)
    assert caught.value.data["sqlstate"] == "23514" and caught.value.data["line"] == 2
    assert "audit_x" not in tables(conn)
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'small_ids'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM seed").fetchone() == (1000,)
    assert ledger(conn) == []


def test_statement_timeout_fails_unchanged(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__slow.sql": "CREATE TABLE slow_t (id int);\nSELECT pg_sleep(5);\n"})
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed) as caught:
        apply(conn, discover(d), actor=ACTOR, statement_timeout="1s")
    assert time.monotonic() - t0 < 4.5
    assert caught.value.data["sqlstate"] == "57014" and caught.value.data["line"] == 2
    assert "statement_timeout=1s" in caught.value.message
    assert "slow_t" not in tables(conn) and ledger(conn) == []
    assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)  # the session is put back


def test_lock_timeout_fails_unchanged(platform: Tierbase, branch: str, tmp_path: Path,
                                      conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__add_col.sql": "ALTER TABLE seed ADD COLUMN note text;\n"})
    with psycopg.connect(platform.branch_url(branch, direct=True)) as holder:
        holder.execute("LOCK TABLE seed IN ACCESS SHARE MODE")  # a long reader: ALTER must wait
        with pytest.raises(MigrationFailed) as caught:
            apply(conn, discover(d), actor=ACTOR, lock_timeout="500ms")
        holder.rollback()
    assert caught.value.data["sqlstate"] == "55P03" and "lock_timeout=500ms" in caught.value.message
    assert query(platform.branch_url(branch, direct=True),
                 "SELECT count(*) FROM information_schema.columns WHERE table_name = 'seed'") == [(2,)]


def test_no_transaction_migration_creates_index_concurrently(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {
        "V0001__col.sql": "ALTER TABLE seed ADD COLUMN IF NOT EXISTS code text;\n",
        "V0002__idx.sql": "-- tierbase:no-transaction\n"
                          "CREATE INDEX CONCURRENTLY IF NOT EXISTS seed_code_idx ON seed (code);\n"
                          "CREATE INDEX CONCURRENTLY IF NOT EXISTS seed_label_idx ON seed (label);\n",
    })
    done = apply(conn, discover(d), actor=ACTOR)
    assert [r["version"] for r in done] == [1, 2]
    valid = conn.execute("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                         "WHERE c.relname IN ('seed_code_idx', 'seed_label_idx') ORDER BY 1").fetchall()
    assert valid == [("seed_code_idx", True), ("seed_label_idx", True)]
    assert ledger(conn) == [1, 2]


def test_no_transaction_failure_says_what_stayed(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__idx.sql": "-- tierbase:no-transaction\n"
                               "CREATE INDEX CONCURRENTLY IF NOT EXISTS seed_label_idx ON seed (label);\n"
                               "CREATE INDEX CONCURRENTLY nope_idx ON no_such_table (x);\n"})
    with pytest.raises(MigrationFailed) as caught:
        apply(conn, discover(d), actor=ACTOR)
    err = caught.value
    assert err.data["line"] == 3 and err.data["sqlstate"] == "42P01" and err.data["statements_run"] == 1
    assert "first 1 statement(s) ran and stay" in err.hint and not err.data["transactional"]
    assert conn.execute("SELECT to_regclass('seed_label_idx') IS NOT NULL").fetchone() == (True,)
    assert ledger(conn) == []


def test_one_migration_run_per_database_and_bad_settings(platform: Tierbase, branch: str, tmp_path: Path,
                                                         conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "CREATE TABLE busy_a (id int);\n"})
    with psycopg.connect(platform.branch_url(branch, direct=True), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (0x74696572, 0x6D696772))  # a run in progress
        with pytest.raises(MigrationBusy) as caught:
            apply(conn, discover(d), actor=ACTOR)
        assert caught.value.exit_code == 2
        # released here: a closed session's backend lets go of its locks a moment after the close
        other.execute("SELECT pg_advisory_unlock(%s, %s)", (0x74696572, 0x6D696772))
    with pytest.raises(MigrationError) as bad:
        apply(conn, discover(d), actor=ACTOR, statement_timeout="soon")
    assert "invalid setting" in bad.value.message
    assert "busy_a" not in tables(conn) and ledger(conn) == []
    assert [r["version"] for r in apply(conn, discover(d), actor=ACTOR)] == [1]


@pytest.mark.parametrize(("body", "said"), [
    ("BEGIN;\nCREATE TABLE tc_b (id int);\nCOMMIT;\n", "BEGIN at line 1, COMMIT at line 3"),
    ("CREATE TABLE tc_b (id int);\nCREATE INDEX CONCURRENTLY tc_idx ON seed (label);\n",
     "CREATE INDEX CONCURRENTLY at line 2"),
])
def test_statements_that_cannot_run_in_the_transaction_are_refused(tmp_path: Path, conn: psycopg.Connection[Any],
                                                                   body: str, said: str) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "CREATE TABLE tc_a (id int);\n", "V0002__b.sql": body})
    with pytest.raises(MigrationError) as caught:
        apply(conn, discover(d), actor=ACTOR)
    assert "V0002__b" in caught.value.message and said in caught.value.message
    assert "tierbase:no-transaction" in caught.value.hint
    assert not tables(conn) & {"tc_a", "tc_b"} and ledger(conn) == []


def test_undo_runs_the_undo_file_and_forgets_the_row(tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "CREATE TABLE undo_a (id int);\n",
                               "U0001__a.sql": "DROP TABLE undo_a;\n",
                               "V0002__b.sql": "CREATE TABLE undo_b (id int);\n"})
    first, second = discover(d)
    apply(conn, [first, second], actor=ACTOR)
    with pytest.raises(MissingUndo) as missing:
        undo(conn, second, actor=ACTOR)
    assert "U0002__b.sql" in missing.value.hint
    with pytest.raises(MigrationError):
        undo(conn, first, actor=ACTOR)  # V0002 is applied after it
    conn.execute("DROP TABLE undo_b")
    conn.execute("DELETE FROM tierbase_meta.schema_migrations WHERE version = 2")
    got = undo(conn, first, actor=ACTOR)
    assert got["version"] == 1 and "undo_a" not in tables(conn) and ledger(conn) == []


# -- verify ------------------------------------------------------------------------------------------------
def branch_gone(platform: Tierbase, name: str) -> bool:
    return platform.store.find(name) is None


def test_verify_ok_on_good_migrations_and_deletes_its_branch(platform: Tierbase, branch: str,
                                                             tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "V0001__items.sql": "CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, label text);\n"
                            "INSERT INTO items SELECT id, label FROM seed WHERE id <= 5 ON CONFLICT DO NOTHING;\n",
        "U0001__items.sql": "DROP TABLE items;\n",
        "V0002__label.sql": "UPDATE seed SET label = trim(label);\n",
        "U0002__label.sql": "SELECT 1;\n",
    })
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert report.ok, report.to_dict()
    assert report.checks == {"lint": "ok", "apply": "ok: applied 2 migration(s)", "idempotent": "ok",
                             "reversible": "ok"}
    assert [r["version"] for r in report.applied] == [1, 2]
    assert report.branch.startswith("verify-") and branch_gone(platform, report.branch)
    url = platform.branch_url(branch, direct=True)
    assert query(url, "SELECT to_regclass('items'), to_regclass('tierbase_meta.schema_migrations')") == [(None, None)]
    assert report.to_dict()["lint"]["ok"] is True


def test_verify_reports_loud_reruns_and_missing_undo_without_failing(platform: Tierbase, branch: str,
                                                                      tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__plain.sql": "CREATE TABLE plain (id bigint);\n"})
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert report.ok, report.to_dict()
    assert "fails loudly on re-run" in report.checks["idempotent"] and "already exists" in report.warnings[0]
    assert report.checks["reversible"] == "skipped: no undo file for V0001__plain"
    assert branch_gone(platform, report.branch)


def test_verify_failing_migration_deletes_its_branch(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__bad.sql": "CREATE TABLE ok_first (id bigint);\nCREAT TABLE oops;\n"})
    report = verify(platform, branch, discover(d), actor=ACTOR, lint_block=[])
    assert not report.ok
    assert report.checks["apply"].startswith("failed: V0001__bad failed at line 2")
    assert report.checks["idempotent"] == "skipped: apply failed"
    assert any("syntax-error" in p for p in report.problems)  # lint sees it too
    assert branch_gone(platform, report.branch)


def test_verify_deletes_its_branch_when_an_exception_escapes(platform: Tierbase, branch: str,
                                                             tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "SELECT 1;\n"})
    name = f"vt-{secrets.token_hex(3)}"  # a caller-chosen name (verify-* is the platform's)
    with pytest.raises(psycopg.OperationalError):
        verify(platform, branch, discover(d), actor=ACTOR, dbname="no_such_db", branch_name=name)
    assert branch_gone(platform, name)


def test_verify_detects_a_non_idempotent_migration(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "V0001__one_more.sql": "INSERT INTO seed VALUES ((SELECT max(id) + 1 FROM seed), 'x');\n"})
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert not report.ok
    assert report.checks["idempotent"].startswith("failed: V0001__one_more is not idempotent")
    assert "public.seed (1001 -> 1002 rows)" in report.checks["idempotent"]
    assert branch_gone(platform, report.branch)
    assert query(platform.branch_url(branch, direct=True), "SELECT count(*) FROM seed") == [(1000,)]


def test_verify_detects_a_schema_changing_rerun(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__grow.sql": "DO $$ BEGIN EXECUTE format("
                                                 "'CREATE TABLE grow_%s (id int)', "
                                                 "(SELECT count(*) FROM pg_tables WHERE tablename LIKE 'grow_%')); "
                                                 "END $$;\n"})
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert not report.ok and "schema: + relation public.grow_1" in report.checks["idempotent"]


def test_verify_lint_blocks(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__idx.sql": "CREATE INDEX IF NOT EXISTS seed_label_idx ON seed (label);\n"})
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert not report.ok and report.checks["lint"] == "failed: 1 blocking finding(s)"
    assert report.checks["apply"].startswith("ok")
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"lint: {d / 'V0001__idx.sql'}:1:1 require-concurrent-index-creation")
    assert branch_gone(platform, report.branch)


def test_verify_undo_round_trip(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    good = write(tmp_path / "good", {
        "V0001__col.sql": "ALTER TABLE seed ADD COLUMN IF NOT EXISTS code text;\n",
        "U0001__col.sql": "ALTER TABLE seed DROP COLUMN code;\n",
        "V0002__idx.sql": "-- tierbase:no-transaction\n"
                          "CREATE INDEX CONCURRENTLY IF NOT EXISTS seed_code_idx ON seed (code);\n",
        "U0002__idx.sql": "DROP INDEX seed_code_idx;\n",
    })
    report = verify(platform, branch, discover(good), actor=ACTOR)
    assert report.ok, report.to_dict()
    assert report.checks["reversible"] == "ok"
    assert branch_gone(platform, report.branch)

    broken = write(tmp_path / "broken", {
        "V0001__idx.sql": "-- tierbase:no-transaction\n"
                          "CREATE INDEX CONCURRENTLY IF NOT EXISTS seed_label_idx ON seed (label);\n",
        "U0001__idx.sql": "-- forgot: DROP INDEX seed_label_idx;\nSELECT 1;\n",
    })
    report = verify(platform, branch, discover(broken), actor=ACTOR)
    assert not report.ok
    reversible = report.checks["reversible"]
    assert reversible.startswith("failed: undo does not restore the schema")
    assert "+ CREATE INDEX seed_label_idx ON public.seed USING btree (label);" in reversible
    assert branch_gone(platform, report.branch)


def test_verify_with_nothing_pending(platform: Tierbase, branch: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"V0001__a.sql": "CREATE TABLE IF NOT EXISTS nothing_a (id bigint);\n"})
    with psycopg.connect(platform.branch_url(branch, direct=True), autocommit=True) as c:
        apply(c, discover(d), actor=ACTOR)
    report = verify(platform, branch, discover(d), actor=ACTOR)
    assert report.ok and report.checks["apply"] == "ok: nothing pending"
    assert branch_gone(platform, report.branch)


def test_migration_dataclass_is_frozen(tmp_path: Path) -> None:
    (m,) = discover(write(tmp_path / "m", {"V0001__a.sql": "SELECT 1;\n"}))
    assert isinstance(m, Migration) and m.to_dict()["label"] == "V0001__a"
    with pytest.raises(AttributeError):
        m.version = 2  # type: ignore[misc]
