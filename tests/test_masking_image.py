"""The masked image of a sensitive tier, refreshed incrementally (pagila, production sensitive, an image).

An incremental refresh re-masks only the rows that changed since the image's source snapshot, in a
clone of the current image; the result must equal a full re-mask of the same tier state, table by
table. What it cannot carry over exactly falls back to the full re-mask and says why; a kill leaves
the old image current; the unmasked source snapshot is out of every non-platform principal's reach.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.control.store import Kind
from tierbase.errors import PolicyDenied, Refused, TierbaseError
from tierbase.governance.masking import MaskRule
from tierbase.migrate import remask
from tierbase.migrate.files import Migration
from tierbase.migrate.promote import PromotionLog
from tierbase.names import ReservedName

from .conftest import TOKENS, as_, needs_root_btrfs, query
from .shop import Shop, api_service, shop_platform
from .test_masking import PAGILA
from .test_masking_work import CONFIG as WORK_CONFIG

pytestmark = [needs_root_btrfs,
              pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")]

CONFIG = WORK_CONFIG.replace("[masking]\n", '[masking]\nimage = ["production"]\n')

# writes on production between two refreshes: updates of masked and unmasked columns, inserts, deletes
CHANGES = """
UPDATE customer SET email = 'changed.' || customer_id || '@mail.example.com', first_name = 'Changed'
  WHERE customer_id % 50 = 1;
UPDATE address SET phone = '+1 (555) 000-' || lpad(address_id::text, 4, '0') WHERE address_id % 40 = 2;
INSERT INTO customer (customer_id, store_id, first_name, last_name, email, address_id, active)
  SELECT 100000 + g, 1, 'New', 'Person', 'new.' || g || '@mail.example.com', 1, 1 FROM generate_series(1, 10) g;
DELETE FROM payment WHERE payment_id % 97 = 0;
UPDATE payment SET amount = amount + 1 WHERE payment_id % 89 = 0;
"""


@pytest.fixture(scope="module")
def shop() -> Iterator[Shop]:
    with shop_platform(CONFIG) as got:  # makes staging and the first image
        yield got


def record(tb: Tierbase) -> dict[str, Any]:
    return dict(tb.store.get_setting("masked_image.production"))


def write(shop: Shop, text: str) -> None:
    with psycopg.connect(shop.admin("production"), autocommit=True) as conn:
        conn.execute("SET search_path = public")
        conn.execute(text)


def contents(shop: Shop, branch: str) -> dict[str, str]:
    with psycopg.connect(shop.admin(branch), autocommit=True) as conn:
        return remask.contents(conn)


def full_remask_now(shop: Shop, name: str) -> str:
    """What serves production now, masked whole by the path a full refresh takes."""
    tb = shop.tb
    src = tb.store.get(tb.store.resolve_route("production") or "production")
    plan = tb._masking_plan(src, force=True)
    tb.branches.create(name, src.name, kind=Kind.FEATURE, creator=tb.gate.owner,
                       prepare=tb._mask_hook(name, src, plan))
    return name


def count(shop: Shop, branch: str, sql: str) -> int:
    return int(query(shop.admin(branch), sql)[0][0])  # type: ignore[call-overload]


def test_an_incremental_refresh_gives_what_a_full_remask_gives(shop: Shop) -> None:
    tb = shop.tb
    first = record(tb)
    assert first["mode"] == "full" and first["why"] == "the tier had no image yet", first
    expected = {q: count(shop, "production", q) for q in (
        "SELECT count(*) FROM customer WHERE customer_id % 50 = 1", "SELECT count(*) FROM address WHERE "
        "address_id % 40 = 2", "SELECT count(*) FROM payment WHERE payment_id % 97 = 0",
        "SELECT count(*) FROM payment WHERE payment_id % 89 = 0 AND payment_id % 97 <> 0")}
    customers, addresses, deleted, payments = expected.values()
    write(shop, CHANGES)
    got = tb.refresh_masked_images("production")[0]
    assert got["mode"] == "incremental" and got["why"] == "only rows changed", got
    detail = got["detail"]
    assert detail["tables_compared"] == 3  # only the tables written since the last image (by row version)
    assert detail["rows_deleted"] == deleted
    # every upserted row of a table with rules is re-masked
    assert detail["tables"]["public.customer"] == {"upserted": customers + 10, "deleted": 0,
                                                   "remasked": customers + 10}
    assert detail["tables"]["public.address"]["remasked"] == addresses
    assert detail["tables"]["public.payment"]["remasked"] == payments
    assert got["rows_remasked"] == customers + 10 + addresses + payments
    # the old image and its unmasked source are gone; the new source is a protected read-only snapshot
    assert tb.store.find(first["branch"]) is None and tb.store.find(first["source_snapshot"]) is None
    src = tb.store.get(got["source_snapshot"])
    assert src.kind is Kind.SNAPSHOT and src.protected and src.creator == tb.gate.owner
    assert not [b.name for b in tb.store.all() if b.name.endswith("-src-run")]  # scratch clones removed
    cmp = full_remask_now(shop, "cmp-full")
    try:
        inc, full = contents(shop, got["image"]), contents(shop, cmp)
        differ = sorted(t for t in set(inc) | set(full) if inc.get(t) != full.get(t))
        assert not differ, differ
        assert len(inc) > 10
    finally:
        tb.delete_branch(cmp)
    # masked: no changed original on the image; a masked branch clones the new image and sees the rows
    originals = {str(r[0]) for r in query(shop.admin("production"), "SELECT email FROM customer WHERE "
                                                                     "email LIKE 'changed.%' OR email LIKE 'new.%'")}
    shown = {str(r[0]) for r in query(shop.admin(got["image"]), "SELECT email FROM customer")}
    assert len(originals) == customers + 10 and not originals & shown
    made = as_(tb, "dev").create_branch("img-inc", "production")
    try:
        assert made["masked_image"]["image"] == got["image"]
        assert count(shop, "img-inc", "SELECT count(*) FROM customer WHERE customer_id > 100000") == 10
        assert count(shop, "img-inc", "SELECT count(*) FROM customer WHERE first_name IN ('New', 'Changed')") == 0
    finally:
        tb.delete_branch("img-inc")
    status = tb.masked_images()[0]
    assert status["current"] and status["mode"] == "incremental" and 0 <= status["staleness_s"] < 600


def first_read(shop: Shop, branch: str) -> dict[str, Any]:
    """What a clone's first count(*) of customer did: buffers dirtied and WAL written (EXPLAIN)."""
    with psycopg.connect(shop.admin(branch), autocommit=True) as conn:
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON) SELECT count(*) FROM customer").fetchone()
    assert row is not None
    return dict(row[0][0]["Plan"])


def test_an_image_is_frozen_so_that_its_clones_read_it_without_writing(shop: Shop) -> None:
    """Masking rewrites every masked row; unfrozen, each clone's first read set hint bits and pruned every
    page (dirtied, WAL, copy-on-write): measured 5x an unmasked branch at 1M customers."""
    tb, dev = shop.tb, as_(shop.tb, "dev")
    write(shop, "UPDATE customer SET first_name = 'Frozen' WHERE customer_id % 40 = 7")
    for full in (False, True):
        got = tb.refresh_masked_images("production", full=full)[0]
        assert got["mode"] == ("full" if full else "incremental"), got
        assert got["freeze_s"] is not None and got["mask_s"] is not None, got
        image = query(shop.admin(got["image"]), "SELECT relpages, relallvisible FROM pg_class "
                                                 "WHERE oid IN ('customer'::regclass, 'address'::regclass)")
        assert all(visible == pages for pages, visible in image), image  # every page all-visible
        dev.create_branch("img-read", "production")
        try:
            plan = first_read(shop, "img-read")
            assert plan["Shared Dirtied Blocks"] == 0 and plan["WAL Bytes"] == 0, plan
        finally:
            tb.delete_branch("img-read")


def test_migrations_are_applied_and_the_fallbacks_say_why(shop: Shop) -> None:
    tb = shop.tb
    files = {"V0001__note.sql": "CREATE TABLE note (id int PRIMARY KEY, body text);\n"
                                "CREATE INDEX customer_last_first_idx ON customer (last_name, first_name);\n"}
    tb.migrate_apply("staging", files=files)
    said = tb.promote("production", "staging", files=files)["masked_images"]
    assert any("(incremental" in s for s in said), said
    rec = record(tb)
    assert rec["migrations_applied"] == ["V0001__note"], rec
    assert query(shop.admin(rec["branch"]), "SELECT to_regclass('public.customer_last_first_idx')::text") == \
        [("customer_last_first_idx",)]
    # rows of the new table reach the image at the next refresh
    write(shop, "INSERT INTO note SELECT g, 'note ' || g FROM generate_series(1, 5) g")
    got = tb.refresh_masked_images("production")[0]
    assert got["mode"] == "incremental" and count(shop, got["image"], "SELECT count(*) FROM note") == 5
    # a migration that writes rows: the full re-mask, naming the statement
    files["V0002__fill.sql"] = "UPDATE note SET body = upper(body);\n"
    tb.migrate_apply("staging", files=files)
    tb.promote("production", "staging", files=files)
    rec = record(tb)
    assert rec["mode"] == "full" and "V0002__fill may write rows (V0002__fill.sql:1 UpdateStmt)" in rec["why"], rec
    # a migration that changes a table's shape
    files["V0003__extra.sql"] = "ALTER TABLE note ADD COLUMN extra int;\n"
    tb.migrate_apply("staging", files=files)
    tb.promote("production", "staging", files=files)
    rec = record(tb)
    assert rec["mode"] == "full" and rec["why"].startswith("the shape of public.note changed"), rec
    # schema-only again: incremental again
    files["V0004__idx.sql"] = "CREATE INDEX note_body_idx ON note (body);\n"
    tb.migrate_apply("staging", files=files)
    tb.promote("production", "staging", files=files)
    assert record(tb)["mode"] == "incremental"
    # a rule change re-masks once, whole
    tb.apply_config(CONFIG + 'customer.active = "noise"\n', "test")
    rec = record(tb)
    assert rec["mode"] == "full" and rec["why"].startswith("the masking rules changed"), rec
    tb.apply_config(CONFIG, "test")
    assert record(tb)["mode"] == "full"
    # a table without a primary key whose rows changed
    write(shop, "CREATE TABLE loose (v text); INSERT INTO loose VALUES ('a')")
    tb.refresh_masked_images("production")
    write(shop, "INSERT INTO loose VALUES ('b')")
    rec = tb.refresh_masked_images("production")[0]
    assert rec["mode"] == "full" and rec["why"] == "public.loose has no primary key and its rows changed", rec
    write(shop, "DROP TABLE loose")
    tb.refresh_masked_images("production")


def test_a_kill_during_an_incremental_refresh_leaves_the_old_image_current(shop: Shop) -> None:
    tb = shop.tb
    before = record(tb)
    write(shop, "UPDATE customer SET last_name = 'Killed' WHERE customer_id % 70 = 3")
    script = f"from tierbase import Tierbase\ntb = Tierbase({str(tb.home.root)!r})\n" \
             "tb.refresh_masked_images('production')\n"
    env = dict(os.environ, TIERBASE_FAILPOINTS="remask:applied", PYTHONPATH=str(Path(__file__).parent.parent))
    got = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == -signal.SIGKILL, got.stderr
    assert record(tb) == before  # the record moves only to a finished image
    half = [b for b in tb.store.all() if b.state.value == "creating"]
    assert [b.name for b in half] and all(b.name.startswith("production-masked-") for b in half)
    made = as_(tb, "dev").create_branch("img-kill", "production")
    assert made["masked_image"]["image"] == before["branch"]  # the old image still serves masked branches
    tb.delete_branch("img-kill")
    done = tb.reconcile()  # the half-made image (its private compute too) is undone
    assert any("undid the unfinished creation" in line for line in done), done
    assert not [b for b in tb.store.all() if b.state.value != "ready"]
    got2 = tb.refresh_masked_images("production")[0]  # and the leftover source snapshot is cleaned
    assert got2["mode"] == "incremental", got2
    left = [b.name for b in tb.store.all() if b.name.startswith("production-masked-") and b.name.endswith("-src")]
    assert left == [got2["source_snapshot"]], left


def test_the_unmasked_source_is_out_of_a_developers_reach(shop: Shop) -> None:
    tb, dev = shop.tb, as_(shop.tb, "dev")
    src = record(tb)["source_snapshot"]
    for name in ("production-masked-99-src", "production-masked-99-src-run"):
        with pytest.raises(ReservedName):
            dev.create_branch(name, "production")
        with pytest.raises(ReservedName):
            tb.create_branch(name, "production")  # not even a platform engineer takes the platform's names
    with pytest.raises(TierbaseError):
        dev.branch_url(src, "shop")  # no credentials on unmasked sensitive data
    with pytest.raises(TierbaseError):
        dev.create_branch("peek-snap", src, snapshot=True)  # a snapshot of it would be unmasked
    with pytest.raises(TierbaseError):
        dev.delete_branch(src)
    with pytest.raises(TierbaseError):
        dev.start_branch(src)
    # neither the source nor the image itself is anyone's to branch: a masked branch of production is
    # cloned from the image by the platform; a branch of either by hand would pin what a refresh removes
    image = record(tb)["branch"]
    for who in (dev, as_(tb, "bot")):
        for parent in (src, image):
            with pytest.raises(PolicyDenied) as refused:
                who.create_branch("peek", parent)
            assert tb.store.find("peek") is None
            if who is dev:
                assert refused.value.data["rule"] == "builtin.platform-only", refused.value.data
                assert "kept by the platform for itself; branch the tier 'production' instead" in \
                    refused.value.message
    denied = tb.audit_log(actor="dev", action="branch.create", denied=True)[-1]
    assert denied["target"] == image and "builtin.platform-only" in denied["reason"]
    with pytest.raises(PolicyDenied, match="kept by the platform for itself"):
        dev.start_branch(image)
    made = tb.create_branch("pe-peek", image)  # a platform engineer may (and gets the image's masking)
    try:
        assert made["masked"]
    finally:
        tb.delete_branch("pe-peek")


def test_a_refresh_is_asked_for_through_the_api_and_the_cli_by_platform_engineers_only(shop: Shop) -> None:
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from tierbase.api.client import Client
    from tierbase.api.server import create_app
    from tierbase.cli.main import cli

    tb = shop.tb
    before = record(tb)
    owner = tb.home.token.read_text().strip()
    run = CliRunner()
    with api_service(tb) as url:
        home = str(tb.home.root)
        for who in ("dev", "bot"):  # refused with the rule, exit 2, nothing re-made; audited
            got = run.invoke(cli, ["--home", home, "masking", "refresh", "production", "--json"],
                             env={"TIERBASE_TOKEN": TOKENS[(home, who)]})
            assert got.exit_code == 2, got.output
            envelope = json.loads(got.stdout)["error"]
            assert envelope["code"] == "policy_denied" and envelope["data"]["rule"] == \
                "builtin.platform-engineers-only", envelope
            assert "only platform engineers re-make masked images" in envelope["message"]
            assert tb.audit_log(actor=who, action="masking.refresh", denied=True)
        with pytest.raises(PolicyDenied):
            Client(url=url, token=TOKENS[(home, "dev")]).refresh_masked_images("production", full=True)
        api = TestClient(create_app(tb))
        refused = api.post("/v1/masking/images/refresh", json={"tier": "production"},
                           headers={"Authorization": f"Bearer {TOKENS[(home, 'bot')]}"})
        assert refused.status_code == 403 and refused.json()["error"]["data"]["rule"] == \
            "builtin.platform-engineers-only"
        assert record(tb) == before
        # bad input: a tier that keeps no image, a field the API does not know; nothing changes
        got = run.invoke(cli, ["--home", home, "masking", "refresh", "staging"], env={"TIERBASE_TOKEN": owner})
        assert got.exit_code == 1 and "tier 'staging' keeps no masked image" in got.output, got.output
        bad = api.post("/v1/masking/images/refresh", json={"tier": "production", "path": "/etc"},
                       headers={"Authorization": f"Bearer {owner}"})
        assert bad.status_code == 422
        assert record(tb) == before
        # a platform engineer: the CLI, then what `masking images` and `status` show
        got = run.invoke(cli, ["--home", home, "masking", "refresh", "production", "--json"],
                         env={"TIERBASE_TOKEN": owner})
        assert got.exit_code == 0, got.output
        made = json.loads(got.stdout)
        assert [m["tier"] for m in made] == ["production"] and made[0]["mode"] == "incremental", made
        assert record(tb)["branch"] == made[0]["image"] != before["branch"]
        done = tb.audit_log(actor=tb.gate.owner, action="masking.refresh")[-1]
        assert done["outcome"] == "ok" and done["after"][0]["image"] == made[0]["image"], done
        got = run.invoke(cli, ["--home", home, "masking", "images", "--json"], env={"TIERBASE_TOKEN": owner})
        images = json.loads(got.stdout)
        assert images[0]["current"] and images[0]["branch"] == made[0]["image"] and images[0]["bytes"] > 0, images
        got = run.invoke(cli, ["--home", home, "status", "--json"], env={"TIERBASE_TOKEN": TOKENS[(home, "dev")]})
        shown = json.loads(got.stdout)["masked_images"]
        assert [(i["tier"], i["mode"], i["rows_remasked"]) for i in shown] == [("production", "incremental", 0)]
        assert shown[0]["staleness_s"] >= 0 and shown[0]["bytes"] > 0
        got = run.invoke(cli, ["--home", home, "status"], env={"TIERBASE_TOKEN": owner})
        assert f"masked image: production: {made[0]['image']} (current)" in got.output, got.output


def test_a_refresh_does_not_race_a_promotion(shop: Shop) -> None:
    tb = shop.tb
    before = record(tb)
    log = PromotionLog(tb.store)
    pid = log.begin("production", "staging", "pe", before["source"])  # a promotion of this process, running
    try:
        with pytest.raises(Refused, match="a promotion of 'production' is running"):
            tb.refresh_masked_images("production")
        assert record(tb) == before
        said = tb.refresh_stale_images(0)
        assert any("could not be re-made" in s for s in said), said
    finally:
        log.finish(pid, "failed", "test: never ran", time.perf_counter())
    assert tb.refresh_masked_images("production")[0]["mode"] == "incremental"


def test_which_migrations_an_image_can_take() -> None:
    """The ledger on both sides says which migrations are new; their text must be at hand and DDL only."""
    def mig(version: int, name: str, text: str) -> Migration:
        return Migration(version, name, Path(f"V{version:04d}__{name}.sql"), text, f"sum{version}", True)

    row = {"version": 1, "name": "a", "checksum": "sum1"}
    one, two = mig(1, "a", "CREATE TABLE a (id int PRIMARY KEY);"), mig(2, "b", "CREATE INDEX b ON a (id);")
    assert remask.new_migrations([row], [row], []) == []
    assert remask.new_migrations([row], [row, {"version": 2, "name": "b", "checksum": "sum2"}], [one, two]) == [two]
    with pytest.raises(remask.FullRemask, match="went back"):
        remask.new_migrations([row, {"version": 2, "name": "b", "checksum": "sum2"}], [row], [one, two])
    with pytest.raises(remask.FullRemask, match="V0002__b reached the tier since the image and its text is not"):
        remask.new_migrations([row], [row, {"version": 2, "name": "b", "checksum": "sum2"}], [one])
    assert remask.writing_statement(two) is None
    fill = mig(3, "fill", "CREATE TABLE c (id int);\nINSERT INTO c VALUES (1);")
    assert remask.writing_statement(fill) == "V0003__fill.sql:2 InsertStmt"
    assert remask.rules_of(["customer.email=email", "customer.*=sensitive", "public.address.phone=partial"]) == [
        MaskRule("customer", "email", "email"), MaskRule("public.address", "phone", "partial")]
