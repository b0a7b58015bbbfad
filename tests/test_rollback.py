"""Rollback keeps the writes: a writer runs through promotions and rollbacks on the production route.

The writer inserts into ``events`` (a table no migration touches) through the proxy, on the
production route, reconnecting whenever its session is ended, and remembers every id the server
acknowledged. After each rollback every acknowledged id must be on whatever serves the route, no id
may be handed out twice, and rows of the table the rolled-back migration changed (``items``) are
reported and left on the replaced branch with the SQL to apply them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.app_rollback import RollbackNeedsConfirmation
from tierbase.errors import InvalidInput, Refused
from tierbase.proxy import ProxyThread
from tierbase.service import Service, make_proxy

from .conftest import free_port_base, make_home, query, teardown_platform

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mkfs.btrfs"),
                                reason="needs root and btrfs-progs")

CONFIG = """
[project]
database = "postgres"

[tiers.production]
protected = true
promote = ["platform-engineer"]

[tiers.staging]
parent = "production"
entry = true
promote = ["platform-engineer"]
"""


class Project:
    def __init__(self, base: Path, tb: Tierbase, me: Tierbase, proxy: ProxyThread) -> None:
        self.base, self.tb, self.me, self.proxy = base, tb, me, proxy
        self.mig = base / "migrations"

    def url(self, route: str) -> str:
        return self.me.branch_url(route).replace(f":{self.tb.proxy_port}/", f":{self.proxy.proxy.port}/")

    def migration(self, name: str, text: str) -> None:
        (self.mig / name).write_text(text)

    def feature(self) -> str:
        """A feature branch of production with every migration of the directory applied."""
        name = f"f-{secrets.token_hex(3)}"
        self.tb.create_branch(name, "production")
        self.tb.migrate_apply(name, str(self.mig))
        return name


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(base / "home")
    t: ProxyThread | None = None
    try:
        tb.init(storage="btrfs", btrfs_size="3G")
        (base / "migrations").mkdir()
        (base / "migrations" / "V0001__tables.sql").write_text(
            "CREATE TABLE events (id bigserial PRIMARY KEY, note text NOT NULL);\n"
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);\n"
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;\n")
        tb.create_branch("bootstrap")
        tb.migrate_apply("bootstrap", str(base / "migrations"))
        tb.promote("production", "bootstrap", str(base / "migrations"))
        (base / "tierbase.toml").write_text(CONFIG)
        tb.reload_config(str(base / "tierbase.toml"))
        # the service's switch over a proxy of this process: a repoint holds the route, as in production
        t = ProxyThread(make_proxy(tb, port=0)).start()
        svc = Service.__new__(Service)
        svc.proxy, svc.loop = t.proxy, t.loop
        me = tb.as_principal(None, token=tb.home.token.read_text().strip())
        me.router = svc
        yield Project(base, tb, me, t)
    finally:
        if t is not None:
            t.stop()
        teardown_platform(tb, base)


class Writer:
    """Inserts into ``events`` (and ``items`` from id 1000 on) through the route until stopped."""

    def __init__(self, url: str, items: bool = True) -> None:
        self.url, self.items = url, items
        self.acked: list[int] = []
        self.items_acked: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        goal = len(self.acked) + n
        end = time.monotonic() + timeout
        while len(self.acked) < goal and time.monotonic() < end:
            time.sleep(0.02)
        assert len(self.acked) >= goal, f"the writer is stuck: {self.errors[-3:]}"

    def _run(self) -> None:
        next_item = 1000 + secrets.randbelow(10_000) * 100
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                row = conn.execute("INSERT INTO events (note) VALUES ('w') RETURNING id").fetchone()
                assert row is not None
                self.acked.append(int(row[0]))
                if self.items and len(self.acked) % 5 == 0:
                    conn.execute("INSERT INTO items (id, name) VALUES (%s, 'written')", (next_item,))
                    self.items_acked.append(next_item)
                    next_item += 1
            except psycopg.errors.UniqueViolation as err:
                self.errors.append(f"reused: {err}")
            except psycopg.Error as err:  # ended by a repoint, or waiting for the route: reconnect
                if "duplicate key" in str(err):
                    self.errors.append(f"reused: {err}")
                conn = None
                time.sleep(0.01)
            time.sleep(0.005)
        if conn is not None:
            conn.close()


def ids_on(url: str) -> set[int]:
    return {int(r[0]) for r in query(url, "SELECT id FROM events")}  # type: ignore[call-overload]


def test_manual_rollback_keeps_every_acknowledged_write(project: Project) -> None:
    p = project
    p.migration("V0002__items_color.sql", "ALTER TABLE items ADD COLUMN color text;\n")
    feat = p.feature()
    with Writer(p.url("production")) as w:
        w.wait_for(20)
        promo = p.me.promote("production", feat, str(p.mig))
        assert promo["status"] == "succeeded"
        w.wait_for(60)
        replaced = p.tb.store.resolve_route("production")
        out = p.me.rollback("production")
        w.wait_for(30)  # the writer goes on, on the new branch
    assert out["snapshot"] == promo["snapshot"] and out["replaced"] == replaced
    assert out["migrations_undone"] == ["V0002__items_color"]
    serving = p.tb.store.resolve_route("production")
    assert serving == out["serving_now"] != replaced
    # every acknowledged write to the unchanged table is on the route, none was handed out twice
    assert not [e for e in w.errors if e.startswith("reused")], w.errors
    assert len(set(w.acked)) == len(w.acked)
    lost = set(w.acked) - ids_on(p.url("production"))
    assert not lost, (sorted(lost), out["replay"], sorted(lost & ids_on(p.url(out["replaced_route"]))))
    assert out["rows_replayed"] > 0 and out["replay"]["replayed"].get("public.events")
    assert out["replay"]["sequences_advanced"].get("public.events_id_seq")
    # the changed table's rows are left on the replaced branch, reported, with SQL that applies them
    assert out["rows_left"] > 0 and "public.items" in out["replay"]["left"]
    assert out["replaced_route"] == "production-replaced-1"
    kept = {int(r[0]) for r in query(p.url(out["replaced_route"]), "SELECT id FROM items WHERE id >= 1000")}
    assert kept and kept <= set(w.items_acked) and p.tb.store.resolve_route(out["replaced_route"]) == replaced
    assert "production-replaced-1" in out["hint"]
    on_route = {int(r[0]) for r in query(p.url("production"), "SELECT id FROM items WHERE id >= 1000")}
    # the rows written since the snapshot were not replayed (the rolled-back migration changed the table)
    assert len(kept - on_route) == out["replay"]["left"]["public.items"]["rows"] > 0
    query(p.tb.branch_url("production", direct=True), out["left_sql"])
    after = {int(r[0]) for r in query(p.url("production"), "SELECT id FROM items WHERE id >= 1000")}
    assert kept <= after
    assert p.tb.rollbacks("production")[-1]["rows_replayed"] == out["rows_replayed"]
    # the git side: a revert commit is proposed, and the flow refuses features that still hold the file
    assert out["revert"]["files"] == ["db/migrations/V0002__items_color.sql"]
    assert "git rm db/migrations/V0002__items_color.sql" in out["revert"]["commands"]
    assert p.tb.rolled_back_migrations("production") == {"V0002__items_color": out["rollback"]}
    (p.mig / "V0002__items_color.sql").unlink()


def test_automatic_rollback_of_a_failed_promotion_keeps_the_writes(project: Project) -> None:
    p = project
    p.migration("V0002__no_poison.sql", "SELECT pg_sleep(1.5);\n"
                "ALTER TABLE items ADD CONSTRAINT items_no_poison CHECK (name <> 'poison');\n")
    feat = p.feature()
    # production gets a row the new CHECK refuses, after the feature validated the migration
    query(p.url("production"), "INSERT INTO items VALUES (999, 'poison')")
    with Writer(p.url("production"), items=False) as w:
        w.wait_for(20)
        with pytest.raises(Refused, match="failed and was rolled back"):
            p.me.promote("production", feat, str(p.mig))
        w.wait_for(30)
    rb = p.tb.rollbacks("production")[-1]
    assert rb["kind"] == "automatic" and rb["status"] == "done"
    assert not [e for e in w.errors if e.startswith("reused")], w.errors
    assert set(w.acked) <= ids_on(p.url("production"))
    assert rb["rows_replayed"] > 0
    # a reflex rollback right after an automatic one is refused without --to and --yes
    with pytest.raises(RollbackNeedsConfirmation, match="already"):
        p.me.rollback("production")
    plan = p.me.rollback("production", dry_run=True)
    assert plan["needs_confirmation"] and plan["dry_run"]
    (p.mig / "V0002__no_poison.sql").unlink()


def test_rollback_refuses_what_is_not_its_own(project: Project) -> None:
    p = project
    p.migration("V0002__staging_only.sql", "CREATE TABLE staging_only (x int PRIMARY KEY);\n")
    feat = f"f-{secrets.token_hex(3)}"
    p.tb.create_branch(feat, "staging")
    p.tb.migrate_apply(feat, str(p.mig))
    rec = p.me.promote("staging", feat, str(p.mig))
    with pytest.raises(Refused, match="holds the data of 'staging'"):
        p.me.rollback("production", to=rec["snapshot"], yes=True)
    with pytest.raises(InvalidInput, match="is not a snapshot"):
        p.me.rollback("production", to=feat, yes=True)
    with pytest.raises(InvalidInput, match="not a declared tier"):
        p.me.rollback("nope")
    (p.mig / "V0002__staging_only.sql").unlink()


def test_kill_during_replay_leaves_the_old_target_whole(project: Project) -> None:
    p = project
    p.migration("V0002__items_weight.sql", "ALTER TABLE items ADD COLUMN weight int;\n")
    feat = p.feature()
    p.me.promote("production", feat, str(p.mig))
    serving = p.tb.store.resolve_route("production")
    query(p.tb.branch_url("production", direct=True), "INSERT INTO events (note) SELECT 'k' FROM "
          "generate_series(1, 500)")
    before = ids_on(p.tb.branch_url("production", direct=True))
    for point in ("rollback:replayed", "rollback:final"):
        script = (f"from tierbase import Tierbase\ntb = Tierbase({str(p.tb.home.root)!r})\n"
                  "tb.rollback('production')\n")
        got = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TIERBASE_FAILPOINTS=point),
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == -signal.SIGKILL, got.stderr
        assert p.tb.store.resolve_route("production") == serving  # the route never moved
        done = p.tb.reconcile()
        assert any("abandoned" in line for line in done), done
        assert ids_on(p.tb.branch_url("production", direct=True)) == before
        assert [r["status"] for r in p.tb.rollbacks("production")][-1] == "abandoned"
        assert p.tb.store.find(p.tb.rollbacks("production")[-1]["serving_now"]) is None
    out = p.me.rollback("production")
    assert before <= ids_on(p.url("production")) and out["rows_replayed"] >= 500
    (p.mig / "V0002__items_weight.sql").unlink()


def test_discard_writes_is_said_loudly(project: Project) -> None:
    p = project
    p.migration("V0002__items_flag.sql", "ALTER TABLE items ADD COLUMN flag bool;\n")
    feat = p.feature()
    p.me.promote("production", feat, str(p.mig))
    query(p.url("production"), "INSERT INTO events (note) SELECT 'discarded' FROM generate_series(1, 50)")
    out = p.me.rollback("production", discard_writes=True)
    assert out["discard_writes"] is True and out["rows_replayed"] == 0
    assert out["hint"].startswith("WRITES DISCARDED") and out["replaced_route"] in out["hint"]
    assert query(p.url("production"), "SELECT count(*) FROM events WHERE note = 'discarded'")[0][0] == 0
    assert query(p.url(out["replaced_route"]), "SELECT count(*) FROM events WHERE note = 'discarded'")[0][0] == 50
    (p.mig / "V0002__items_flag.sql").unlink()


def test_a_rolled_back_staging_accepts_merges_again(project: Project) -> None:
    p = project
    # staging holds V0002__staging_only from the test above; this one adds V0003
    p.migration("V0002__staging_only.sql", "CREATE TABLE staging_only (x int PRIMARY KEY);\n")
    p.migration("V0003__staging_table.sql", "CREATE TABLE IF NOT EXISTS staged (x int PRIMARY KEY);\n")
    feat = f"f-{secrets.token_hex(3)}"
    p.tb.create_branch(feat, "staging")
    p.tb.migrate_apply(feat, str(p.mig))
    p.me.promote("staging", feat, str(p.mig))
    out = p.me.rollback("staging")
    assert p.tb.store.resolve_route("staging") == out["serving_now"]
    assert p.tb.gate.subject(p.tb.store.get(out["serving_now"])).tier == "staging"
    # a feature off the rolled-back tier follows its route, and merges into it like before
    again = f"f-{secrets.token_hex(3)}"
    p.tb.create_branch(again, "staging")
    assert p.tb.get_branch(again, with_bytes=False)["parent"] == out["serving_now"]
    p.tb.migrate_apply(again, str(p.mig))
    rec = p.me.promote("staging", again, str(p.mig))
    assert rec["status"] == "succeeded" and rec["migrations"][-1] == "V0003__staging_table"
    assert "V0003__staging_table" not in p.tb.rolled_back_migrations("staging")  # promoted again
    for f in ("V0002__staging_only.sql", "V0003__staging_table.sql"):
        (p.mig / f).unlink()


def test_rehearsal_catches_a_long_locking_migration(project: Project) -> None:
    p = project
    strict = p.base / "strict.toml"
    strict.write_text(CONFIG.replace('promote = ["platform-engineer"]\n', 'promote = ["platform-engineer"]\n'
                                     'max_stall = "1s"\n', 1))
    p.tb.reload_config(str(strict))
    query(p.url("production"), "INSERT INTO events (note) SELECT 'r' FROM generate_series(1, 200)")
    # the one-transaction backfill: every row of a hot table locked until the file's transaction ends
    p.migration("V0002__backfill.sql", "UPDATE events SET note = note || '';\nSELECT pg_sleep(3);\n")
    feat = p.feature()
    serving, promotions = p.tb.store.resolve_route("production"), len(p.tb.promotions("production"))
    try:
        with pytest.raises(Refused, match=r"stalled .* \(max_stall 1s\)") as exc:
            p.me.promote("production", feat, str(p.mig), rehearse=True)
        ev = exc.value.data["rehearsal"]
        assert ev["longest_stall_s"] > 1 and ev["stall_table"] == "public.events" and ev["writes"] > 0
        assert ev["statement"] and ("UPDATE events" in ev["statement"] or "pg_sleep" in ev["statement"])
        # nothing reached the tier: no promotion, no snapshot, the same branch serves it
        assert p.tb.store.resolve_route("production") == serving
        assert len(p.tb.promotions("production")) == promotions
        assert not [b for b in p.tb.store.all() if b.name.startswith("verify-rehearse-")]
        (p.mig / "V0002__backfill.sql").unlink()
        p.migration("V0002__tag.sql", "ALTER TABLE events ADD COLUMN tag text;\n")
        quick = p.feature()
        rec = p.me.promote("production", quick, str(p.mig), rehearse=True)
        assert rec["status"] == "succeeded" and rec["rehearsal"]["longest_stall_s"] < 1
        assert rec["rehearsal"]["migrations"] == ["V0002__tag"]
    finally:
        for f in ("V0002__backfill.sql", "V0002__tag.sql"):
            (p.mig / f).unlink(missing_ok=True)
        p.tb.reload_config(str(p.base / "tierbase.toml"))
