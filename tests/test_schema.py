"""meta.db's tables come from one schema module, versioned by PRAGMA user_version; a data dir made
before versions were kept upgrades in place with its data; a newer one is refused, unchanged."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from tierbase.control import schema
from tierbase.control.store import Store
from tierbase.errors import TierbaseError
from tierbase.governance.principals import Principals

#: meta.db as the first builds made it: no branches.masking/actor, no intents.actor, no principals.scram,
#: no promotions or workflow tables yet, user_version 0
OLD = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE branches (
    name TEXT PRIMARY KEY, parent TEXT REFERENCES branches(name), kind TEXT NOT NULL, state TEXT NOT NULL,
    volume TEXT NOT NULL UNIQUE, port INTEGER NOT NULL UNIQUE, created_at REAL NOT NULL, fork_lsn TEXT,
    creator TEXT NOT NULL, ttl_seconds INTEGER, expires_at REAL, protected INTEGER NOT NULL DEFAULT 0,
    owner TEXT);
CREATE TABLE routes (name TEXT PRIMARY KEY, branch TEXT NOT NULL REFERENCES branches(name),
    updated_at REAL NOT NULL);
CREATE TABLE intents (id INTEGER PRIMARY KEY, op TEXT NOT NULL, branch TEXT NOT NULL, volume TEXT NOT NULL,
    owner TEXT NOT NULL, started_at REAL NOT NULL);
CREATE TABLE principals (name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL, created_by TEXT NOT NULL, revoked_at REAL);
INSERT INTO settings VALUES ('driver', '"btrfs"'), ('port_base', '25432');
INSERT INTO branches VALUES ('production', NULL, 'tier', 'ready', 'production.0a0b0c0d', 25432, 1.0, '0/1',
    'alice', NULL, NULL, 1, NULL);
INSERT INTO branches VALUES ('feat', 'production', 'feature', 'ready', 'feat.01020304', 25433, 2.0, '0/2',
    'alice', NULL, NULL, 0, NULL);
INSERT INTO routes VALUES ('staging', 'feat', 3.0);
INSERT INTO principals VALUES ('alice', 'platform-engineer', 'h1', 1.0, 'alice', NULL);
"""


def tables(path: Path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {n: [r[1] for r in db.execute(f"PRAGMA table_info({n})")] for n in names}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_fresh_data_dir_gets_every_table_at_the_latest_version(tmp_path: Path) -> None:
    Store(tmp_path / "meta.db").close()
    got = tables(tmp_path / "meta.db")
    assert set(got) == {"settings", "branches", "routes", "intents", "principals", "audit", "audit_head",
                        "promotions", "flow_events", "flow_tiers", "flow_workspaces", "ci_jobs", "sessions",
                        "masking_lineage", "pitr_archives", "pitr_bases", "promotion_touches", "rollbacks",
                        "rollback_slots"}
    assert user_version(tmp_path / "meta.db") == schema.LATEST == 7
    for table, column, _ in schema.ADDED_COLUMNS:
        assert column in got[table]


def test_a_data_dir_from_before_versions_upgrades_in_place_with_its_data(tmp_path: Path) -> None:
    db = tmp_path / "meta.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD)
    assert user_version(db) == 0
    store = Store(db)
    try:
        assert user_version(db) == schema.LATEST
        assert [b.name for b in store.all()] == ["production", "feat"]
        feat = store.get("feat")
        assert (feat.parent, feat.volume, feat.port, feat.masked_by, feat.actor) == (
            "production", "feat.01020304", 25433, [], None)
        assert store.routes() == {"staging": "feat"} and store.get_setting("driver") == "btrfs"
        alice = Principals(store).get("alice")
        assert alice.role == "platform-engineer"
        assert Principals(store).verifier("alice") is None  # the new column, empty
        # the tables that came later exist now and work
        store.db.execute("INSERT INTO flow_events(feature, transition, state, actor, at, evidence) "
                         "VALUES('f', 'claim', 'feature-claimed', 'alice', 1.0, '{}')")
    finally:
        store.close()
    before = tables(db)
    assert schema.migrate(sqlite3.connect(db, isolation_level=None)) == []  # a second open does nothing
    assert tables(db) == before


def test_todays_data_dir_without_a_version_upgrades_too(tmp_path: Path) -> None:
    """Made by the build just before the schema module: every table and column, user_version 0."""
    db = tmp_path / "meta.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(schema.TABLES)
        conn.execute("INSERT INTO settings VALUES ('owner', '\"alice\"')")
    store = Store(db)
    try:
        assert user_version(db) == schema.LATEST and store.get_setting("owner") == "alice"
    finally:
        store.close()


def test_a_newer_meta_db_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "meta.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD)
        conn.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    before = tables(db)
    with pytest.raises(TierbaseError, match="newer than this tierbase's") as err:
        Store(db)
    assert "Use the tierbase version that wrote it" in err.value.hint
    assert tables(db) == before and user_version(db) == schema.LATEST + 1


def test_a_failed_migration_leaves_the_version_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "meta.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE branches ADD COLUMN half TEXT")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS[:1], schema.Migration(2, "broken", broken)))
    with pytest.raises(RuntimeError):
        Store(db)
    assert user_version(db) == 1 and "half" not in tables(db)["branches"]
    monkeypatch.undo()
    Store(db).close()
    assert user_version(db) == schema.LATEST


def test_concurrent_opens_migrate_once(tmp_path: Path) -> None:
    db = tmp_path / "meta.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD)
    done: list[list[int]] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            done.append(schema.migrate(conn))
        except BaseException as err:  # pragma: no cover - the assertion below names it
            errors.append(err)
        finally:
            conn.close()

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(v for d in done for v in d) == [1, 2, 3, 4, 5, 6, 7]  # each migration ran exactly once
    assert user_version(db) == schema.LATEST


def test_no_module_but_the_schema_creates_tables() -> None:
    package = Path(schema.__file__).resolve().parent.parent
    def having(text: str) -> list[str]:
        return sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                      if text in p.read_text() and p.name != "schema.py")

    assert having(".executescript(") == []
    # tables in postgres (each branch's migration ledger, the audit trail's SQL mirror) are not meta.db's
    assert having("CREATE TABLE IF NOT EXISTS") == ["governance/mirror.py", "migrate/ledger.py"]
