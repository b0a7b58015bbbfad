"""Rollback replay by logical decoding (migrate/logical.py): a slot made at each promotion names the rows
written since, so a rollback compares only those keys.

Same platform and writer as tests/test_rollback.py: a writer inserts through the production route the
whole time; every acknowledged write to an unchanged table must be on whatever serves the route after
the rollback, no id handed out twice, conflicts reported. And no slot may outlive its use: after a
rollback, the next promotion and a delete, the only slot on disk is the live promotion's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tierbase.control.store import Kind
from tierbase.provider import SUPERUSER

from .conftest import query
from .test_rollback import Project, Writer, ids_on, project  # noqa: F401  (the module's platform)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/lib/postgresql/15/lib/wal2json.so").exists(),
                                reason="needs root and the wal2json plugin (postgresql-15-wal2json)")


def slots_on_disk(p: Project) -> set[tuple[str, str]]:
    """(branch, slot) for every slot directory in a writable branch's data dir (snapshots never start)."""
    out = set()
    for b in p.tb.store.all():
        if b.kind is Kind.SNAPSHOT:
            continue
        d = p.tb.branches.provider.datadir(b.volume) / "pg_replslot"
        out |= {(b.name, e.name) for e in d.iterdir()} if d.is_dir() else set()
    return out


def direct(p: Project, branch: str) -> str:
    return p.tb.branch_url(branch, direct=True)


def promote(p: Project, name: str, text: str) -> dict[str, object]:
    p.migration(name, text)
    rec = p.me.promote("production", p.feature(), str(p.mig))
    assert rec["status"] == "succeeded"
    return rec


def test_logical_rollback_keeps_every_write_and_reports_conflicts(project: Project) -> None:  # noqa: F811
    p = project
    query(p.url("production"), "CREATE TABLE tags (id int PRIMARY KEY, name text UNIQUE NOT NULL, body text)")
    query(p.url("production"), "INSERT INTO tags VALUES (1, 'a', NULL), (2, 'b', NULL), (3, 'c', NULL)")
    with Writer(p.url("production")) as w:
        w.wait_for(20)
        rec = promote(p, "V0002__items_size.sql", "ALTER TABLE items ADD COLUMN size int;\n")
        serving = p.tb.store.resolve_route("production")
        assert slots_on_disk(p) == {(serving, f"tierbase_rb_{rec['id']}")}
        w.wait_for(40)
        # a swap of unique names (a conflict when replayed row by row), an update, a delete, a big value
        with_swap = ("BEGIN; UPDATE tags SET name = 'tmp' WHERE id = 1; UPDATE tags SET name = 'a' WHERE id = 2; "
                     "UPDATE tags SET name = 'b' WHERE id = 1; COMMIT")
        query(p.url("production"), with_swap)
        query(p.url("production"), "UPDATE tags SET body = repeat('x', 100000) WHERE id = 3")
        query(p.url("production"), "INSERT INTO tags VALUES (4, 'd', 'new'), (5, 'e', 'gone')")
        query(p.url("production"), "DELETE FROM tags WHERE id = 5")
        out = p.me.rollback("production")
        w.wait_for(30)
    assert out["replay"]["method"] == "logical" and out["replay"]["fallback"] is None, out["replay"]
    assert out["replay"]["decoded"][0]["changes"] > 0
    assert not [e for e in w.errors if e.startswith("reused")], w.errors
    assert len(set(w.acked)) == len(w.acked)
    lost = set(w.acked) - ids_on(p.url("production"))
    assert not lost, (sorted(lost), out["replay"])
    assert out["replay"]["sequences_advanced"].get("public.events_id_seq")
    # the table the rolled-back migration changed: left on the replaced branch, with SQL
    assert "public.items" in out["replay"]["left"] and out["left_sql"]
    assert out["replay"]["left"]["public.items"]["why"] == "changed by the rolled-back migrations"
    # tags: the swap is a conflict (reported, SQL kept), the rest is replayed
    tags = dict(query(p.url("production"), "SELECT id, coalesce(length(body), 0) FROM tags"))  # type: ignore[arg-type]
    assert tags.get(3) == 100000 and tags.get(4) == 3 and 5 not in tags
    assert out["replay"]["left"]["public.tags"]["why"].startswith("conflict")
    assert "INSERT INTO" in out["left_sql"] and '"tags"' in out["left_sql"]
    # the slot went with the rollback: nothing holds WAL for the replaced branch, the new one has none
    assert slots_on_disk(p) == set()
    assert not query(direct(p, out["replaced"]), "SELECT slot_name FROM pg_replication_slots")
    (p.mig / "V0002__items_size.sql").unlink()


def test_the_slot_goes_at_the_next_promotion_and_never_travels_into_a_copy(project: Project) -> None:  # noqa: F811
    p = project
    first = promote(p, "V0002__ev_a.sql", "ALTER TABLE events ADD COLUMN a int;\n")
    serving = p.tb.store.resolve_route("production")
    # a feature forked while the slot lives starts without it (wal_level=replica would refuse to start)
    feat = p.feature()
    p.tb.start_branch(feat)
    assert not query(direct(p, feat), "SELECT slot_name FROM pg_replication_slots")
    second = promote(p, "V0003__ev_b.sql", "ALTER TABLE events ADD COLUMN b int;\n")
    assert p.tb.store.resolve_route("production") == serving
    assert slots_on_disk(p) == {(serving, f"tierbase_rb_{second['id']}")}, first
    p.me.delete_branch(feat)
    assert slots_on_disk(p) == {(serving, f"tierbase_rb_{second['id']}")}
    assert p.tb.store.find(feat) is None
    # back past both promotions: the first one's slot went at the second, so the data diff replays
    out = p.me.rollback("production", to=str(first["snapshot"]), yes=True)
    assert out["replay"]["method"] == "diff", out["replay"]
    assert f"tierbase_rb_{first['id']}" in out["replay"]["fallback"] and "promotion" in out["replay"]["fallback"]
    assert out["replaced"] == serving and slots_on_disk(p) == set()
    for f in ("V0002__ev_a.sql", "V0003__ev_b.sql"):
        (p.mig / f).unlink()


def test_kill_during_logical_replay_reconciles_and_the_slot_survives(project: Project) -> None:  # noqa: F811
    p = project
    promote(p, "V0002__items_depth.sql", "ALTER TABLE items ADD COLUMN depth int;\n")
    serving = p.tb.store.resolve_route("production")
    query(direct(p, "production"), "INSERT INTO events (note) SELECT 'k' FROM generate_series(1, 500)")
    before = ids_on(direct(p, "production"))
    for point in ("rollback:replayed", "rollback:final"):
        script = (f"from tierbase import Tierbase\ntb = Tierbase({str(p.tb.home.root)!r})\n"
                  "tb.rollback('production')\n")
        got = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TIERBASE_FAILPOINTS=point),
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == -signal.SIGKILL, got.stderr
        assert p.tb.store.resolve_route("production") == serving  # the old target, whole
        assert any("abandoned" in line for line in p.tb.reconcile())
        assert ids_on(direct(p, "production")) == before
    out = p.me.rollback("production")
    # the killed attempts read temporary copies: the promotion's slot was still whole for this one
    assert out["replay"]["method"] == "logical", out["replay"]
    assert before <= ids_on(p.url("production")) and out["rows_replayed"] >= 500
    assert slots_on_disk(p) == set()
    (p.mig / "V0002__items_depth.sql").unlink()


def test_an_invalidated_slot_falls_back(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Past max_slot_wal_keep_size the slot is invalidated; the rollback uses the data diff and says so."""
    p = project
    monkeypatch.setenv("TIERBASE_ROLLBACK_SLOT_MAX_WAL", "1MB")
    serving = p.tb.store.resolve_route("production")
    p.tb.stop_branch(serving)
    p.tb.start_branch(serving)
    assert query(direct(p, serving), "SHOW max_slot_wal_keep_size")[0][0] == "1MB"
    rec = promote(p, "V0002__items_mark.sql", "ALTER TABLE items ADD COLUMN mark int;\n")
    with p.tb.core.connect(serving, SUPERUSER) as su:  # the platform's own session: switching WAL files
        for _ in range(3):  # more WAL than the slot may keep, then a checkpoint invalidates it
            su.execute("INSERT INTO events (note) SELECT 'wal' FROM generate_series(1, 20000)")
            su.execute("SELECT pg_switch_wal()")
        su.execute("CHECKPOINT")
        state = su.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                           (f"tierbase_rb_{rec['id']}",)).fetchall()
    assert state == [("lost",)]
    written = ids_on(direct(p, serving))
    out = p.me.rollback("production")
    assert out["replay"]["method"] == "diff" and "invalidated" in out["replay"]["fallback"]
    assert written <= ids_on(p.url("production"))
    assert slots_on_disk(p) == set()
    monkeypatch.delenv("TIERBASE_ROLLBACK_SLOT_MAX_WAL")
    new = p.tb.store.resolve_route("production")
    p.tb.stop_branch(new)
    p.tb.start_branch(new)
    (p.mig / "V0002__items_mark.sql").unlink()


def test_the_diff_setting_drops_the_slot(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Switched to rollback_replay=diff, a tier restarts at wal_level=replica: its slot must go first."""
    p = project
    promote(p, "V0002__items_hue.sql", "ALTER TABLE items ADD COLUMN hue int;\n")
    serving = p.tb.store.resolve_route("production")
    assert slots_on_disk(p)
    monkeypatch.setenv("TIERBASE_ROLLBACK_REPLAY", "diff")
    p.tb.stop_branch(serving)
    p.tb.start_branch(serving)  # wal_level=replica refuses to start with a logical slot: it went first
    assert query(direct(p, serving), "SHOW wal_level")[0][0] == "replica" and slots_on_disk(p) == set()
    query(direct(p, serving), "INSERT INTO events (note) SELECT 'd' FROM generate_series(1, 50)")
    written = ids_on(direct(p, serving))
    out = p.me.rollback("production")
    assert out["replay"]["method"] == "diff" and out["replay"]["fallback"] is None
    assert written <= ids_on(p.url("production"))
    monkeypatch.delenv("TIERBASE_ROLLBACK_REPLAY")
    new = p.tb.store.resolve_route("production")
    p.tb.stop_branch(new)
    p.tb.start_branch(new)
    (p.mig / "V0002__items_hue.sql").unlink()


def test_keys_of_every_kind_replay_exactly(project: Project) -> None:  # noqa: F811
    """Composite, bytea, timestamptz and text keys, a key changed by an UPDATE, a TRUNCATE, a table without
    a primary key and one made after the promotion: the route ends equal to the replaced branch."""
    p = project
    setup = ["CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b))",
             "CREATE TABLE blobs (k bytea PRIMARY KEY, v jsonb)",
             "CREATE TABLE stamps (t timestamptz PRIMARY KEY, v numeric)",
             "CREATE TABLE wiped (id int PRIMARY KEY)", "CREATE TABLE loose (x int)",
             "INSERT INTO pairs SELECT g, 'k' || g, g FROM generate_series(1, 50) g",
             "INSERT INTO blobs SELECT decode(md5(g::text), 'hex'), jsonb_build_object('g', g) "
             "FROM generate_series(1, 50) g",
             "INSERT INTO stamps SELECT '2026-01-01'::timestamptz + g * interval '1 hour', g "
             "FROM generate_series(1, 50) g",
             "INSERT INTO wiped SELECT generate_series(1, 20)", "INSERT INTO loose SELECT generate_series(1, 5)"]
    for stmt in setup:
        query(p.url("production"), stmt)
    promote(p, "V0002__items_tone.sql", "ALTER TABLE items ADD COLUMN tone int;\n")
    writes = ["UPDATE pairs SET b = 'moved', v = -1 WHERE a = 3", "DELETE FROM pairs WHERE a = 4",
              "INSERT INTO pairs VALUES (3, 'k3', 33)",
              "UPDATE blobs SET v = '{\"nan\": \"NaN\", \"s\": \"x\"}' WHERE k = decode(md5('7'), 'hex')",
              "UPDATE blobs SET k = '\\x00ff'::bytea WHERE k = decode(md5('8'), 'hex')",
              "UPDATE stamps SET v = 'NaN' WHERE v = 5", "DELETE FROM stamps WHERE v = 6",
              "INSERT INTO stamps VALUES ('2030-06-01 12:34:56.789+02', 1.5)",
              "TRUNCATE wiped", "INSERT INTO wiped VALUES (100)", "INSERT INTO loose VALUES (6)",
              "CREATE TABLE later (id int PRIMARY KEY)", "INSERT INTO later VALUES (1)"]
    for stmt in writes:
        query(p.url("production"), stmt)
    out = p.me.rollback("production")
    assert out["replay"]["method"] == "logical", out["replay"]
    tables = ("pairs", "blobs", "stamps", "wiped")
    for t in tables:
        q = f"SELECT to_jsonb(x)::text FROM {t} x ORDER BY 1"
        assert query(p.url("production"), q) == query(p.url(out["replaced_route"]), q), (t, out["replay"]["left"])
    # what cannot be matched by key, or does not exist on the snapshot, is left and said so
    assert out["replay"]["left"]["public.loose"]["why"].startswith("no-primary-key")
    assert out["replay"]["left"]["public.later"]["why"].startswith("only-in-b")
    assert {"public.wiped"} <= set(out["replay"]["decoded"][0]["whole_tables"])
    (p.mig / "V0002__items_tone.sql").unlink()


def test_a_long_transaction_at_promotion_means_no_slot_not_a_stuck_promotion(project: Project) -> None:  # noqa: F811
    """Making a slot waits for the transactions running then; a promotion waits 5 s at most, then goes on
    without one, and the rollback uses the data diff, saying why."""
    p = project
    with psycopg.connect(p.url("production"), autocommit=False) as held:
        held.execute("INSERT INTO events (note) VALUES ('open')")  # an xid, open across the promotion
        t0 = time.monotonic()
        rec = promote(p, "V0002__items_glow.sql", "ALTER TABLE items ADD COLUMN glow int;\n")
        assert time.monotonic() - t0 < 60
        held.commit()
    query(p.url("production"), "INSERT INTO events (note) SELECT 'n' FROM generate_series(1, 20)")
    written = ids_on(direct(p, "production"))
    out = p.me.rollback("production")
    assert out["replay"]["method"] == "diff" and f"#{rec['id']} made no slot" in out["replay"]["fallback"]
    assert "timeout" in out["replay"]["fallback"] and out["replay_fallback"] == out["replay"]["fallback"]
    assert written <= ids_on(p.url("production"))
    (p.mig / "V0002__items_glow.sql").unlink()
