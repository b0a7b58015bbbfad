"""Benchmark: what masking adds to creating a branch.

    python bench/masking.py --customers 100000,1000000 --out bench/results/masking.json

Needs root (the platform loop-mounts a btrfs image). On a throwaway tierbase platform under
/tmp it restores pagila's schema into one database per size, generates N customers (one
address each, with a phone) and N payments (spread over pagila's payment partitions), and
measures, per size and run:

* plain: create the branch, start its compute, first query (no masking);
* masked: the same, then ``apply_masking`` with customer.email=email, customer.first_name=hash,
  customer.last_name=hash, address.phone=partial, payment.amount=noise, then first query;
* what the masked branch adds on disk (masking rewrites every masked row);
* imaged: with ``[masking] image = ["production"]``, a developer's masked branch of production made
  by the platform (a clone of production's masked image, cloned 3 times per image; the image is frozen
  before it is cloned: app_images.py), and what re-making the image costs (once
  per promotion or rule change, instead of once per branch): whole (a full re-mask), and
  incrementally after 1,000 customer updates + 100 inserts + 100 payment deletes on production
  (only those rows re-masked, in a clone of the current image).

Writes JSON in the shared results shape, then renders docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform as host
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.common import log, pct, port_free, write_results  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import find_binaries  # noqa: E402
from tierbase.errors import TierbaseError  # noqa: E402
from tierbase.governance.masking import apply_masking, parse_rules  # noqa: E402

PAGILA = REPO / "tests" / "fixtures" / "pagila" / "pagila-schema.sql"
RULES = {"customer.email": "email", "customer.first_name": "hash", "customer.last_name": "hash",
         "address.phone": "partial", "payment.amount": "noise"}
KEY = secrets.token_bytes(32)
TITLE = "Masking cost"
CLONES = 3  # masked branches cloned from each image
TARGET_RATIO = 2.0  # issue 13: a masked branch within 2x of an unmasked one at 1M customers
MiB = 1024 ** 2

# rows from generate_series; replica mode skips FK checks and last_updated triggers while loading
LOAD = """
SET session_replication_role = replica;
INSERT INTO country (country_id, country) SELECT g, 'Country ' || g FROM generate_series(1, 100) g;
INSERT INTO city (city_id, city, country_id) SELECT g, 'City ' || g, 1 + g % 100 FROM generate_series(1, 600) g;
INSERT INTO address (address_id, address, district, city_id, postal_code, phone)
  SELECT g, g || ' Main Street', 'District ' || g % 40, 1 + g % 600, lpad((g % 99999)::text, 5, '0'),
         format('+1 (%s) %s-%s', 200 + g % 700, lpad((g / 700 % 1000)::text, 3, '0'), lpad((g % 10000)::text, 4, '0'))
  FROM generate_series(1, {n} + 4) g;
INSERT INTO store (store_id, manager_staff_id, address_id) VALUES (1, 1, {n} + 1), (2, 2, {n} + 2);
INSERT INTO staff (staff_id, first_name, last_name, address_id, email, store_id, username)
  VALUES (1, 'Mike', 'Hillyer', {n} + 3, 'mike@sakila.example', 1, 'mike'),
         (2, 'Jon', 'Stephens', {n} + 4, 'jon@sakila.example', 2, 'jon');
INSERT INTO customer (customer_id, store_id, first_name, last_name, email, address_id, active)
  SELECT g, 1 + g % 2, f, l, lower(f || '.' || l || '.' || g || '@mail.example.com'), g, 1
  FROM generate_series(1, {n}) g,
  LATERAL (SELECT (ARRAY['Mary','Patricia','Linda','Barbara','Elizabeth','Jennifer','Maria','Susan',
                         'James','John','Robert','Michael','William','David','Richard','Joseph'])[1 + g % 16] AS f,
                  (ARRAY['Smith','Johnson','Williams','Brown','Jones','Garcia','Miller','Davis','Rodriguez',
                         'Martinez','Hernandez','Lopez','Gonzalez','Wilson','Anderson','Thomas','Taylor',
                         'Moore','Jackson','Martin','Lee','Perez','Thompson','White'])[1 + (g / 16) % 24] AS l) x;
INSERT INTO language (language_id, name) VALUES (1, 'English');
INSERT INTO film (film_id, title, language_id, fulltext)
  SELECT g, 'Film ' || g, 1, to_tsvector('Film ' || g) FROM generate_series(1, 100) g;
INSERT INTO inventory (inventory_id, film_id, store_id) SELECT g, 1 + g % 100, 1 + g % 2 FROM generate_series(1, 500) g;
INSERT INTO rental (rental_id, rental_date, inventory_id, customer_id, staff_id)
  SELECT g, timestamptz '2022-01-01 00:00+00' + g * interval '1 minute', 1 + g % 500, 1 + g % {n}, 1 + g % 2
  FROM generate_series(1, {rentals}) g;
INSERT INTO payment (payment_id, customer_id, staff_id, rental_id, amount, payment_date)
  SELECT g, 1 + g % {n}, 1 + g % 2, 1 + g % {rentals}, round((0.99 + (g % 12))::numeric, 2),
         timestamptz '2022-01-02 00:00+00' + (g % 150) * interval '1 day' + (g % 86000) * interval '1 second'
  FROM generate_series(1, {n}) g;
RESET session_replication_role;
"""


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def free_port_base() -> int:
    """A base above the kernel's ephemeral range and the test suite's bases (20000-59999)."""
    for _ in range(100):
        base = 61000 + secrets.randbelow(20) * 200
        if all(port_free(p) for p in range(base, base + 60)):
            return base
    raise RuntimeError("no free port range in 61000-65000")


def settle(tb: Tierbase) -> None:
    """Wait until btrfs has really dropped deleted subvolumes, so the next run does not pay for it."""
    root = str(tb.branches.provider.driver.root)  # the local provider's volume root
    for args in (["btrfs", "filesystem", "sync", root], ["btrfs", "subvolume", "sync", root]):
        subprocess.run(args, capture_output=True, check=True)


def load(tb: Tierbase, db: str, n: int) -> int:
    """Restore pagila's schema into ``db`` on production and fill it; returns the database size."""
    t0 = time.perf_counter()
    tb.import_dump(str(PAGILA), "production", db)
    with psycopg.connect(admin(tb, "production", db), autocommit=True) as conn:
        conn.execute("SET search_path = public")
        conn.execute(LOAD.format(n=n, rentals=max(100, n // 10)))
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")  # every branch starts from a clean parent, not from the load's dirty pages
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    size = int(row[0]) if row else 0
    log(f"  loaded {n:,} customers into {db}: {human_bytes(size)} in {time.perf_counter() - t0:.1f}s")
    return size


def admin(tb: Tierbase, branch: str, db: str) -> str:
    """The platform's superuser on a branch (unix socket, peer auth): loading in replica mode and masking
    are platform duties, which no principal's URL can do."""
    tb.branches.start(branch)
    return tb.branches.provider.endpoint(tb.store.get(branch).port, db).dsn()


def sample(tb: Tierbase, db: str, mode: str) -> dict[str, Any]:
    """One branch: ``plain`` (no masking), ``masked``, or ``rewrite`` (the masked columns set to themselves
    in one transaction, in replica mode: what rewriting those rows costs, whatever the masks)."""
    name = f"mb-{secrets.token_hex(3)}"
    t0 = time.perf_counter()
    tb.create_branch(name)
    tb.start_branch(name)
    report: dict[str, Any] = {}
    wal = None
    try:
        with psycopg.connect(admin(tb, name, db), connect_timeout=60) as conn:
            lsn = scalar(conn, "SELECT pg_current_wal_lsn()")
            conn.commit()
            if mode == "masked":
                report = apply_masking(conn, parse_rules(RULES), KEY)
            elif mode == "rewrite":
                report = rewrite(conn)
            wal = int(scalar(conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", lsn))
            conn.execute("SELECT count(*) FROM customer").fetchone()
            done = time.perf_counter()
            if mode == "masked" and scalar(conn, "SELECT count(*) FROM customer WHERE email LIKE %s",
                                           "%@mail.example.com") != 0:
                raise RuntimeError(f"customers still have their original e-mail on {name}")
            conn.rollback()
        added = tb.get_branch(name).get("own_bytes")
    finally:
        tb.delete_branch(name)
        settle(tb)
    return {"total_s": done - t0, "mask_s": report.get("seconds"), "tables": report.get("tables"),
            "timings": report.get("timings"), "added_bytes": added, "wal_bytes": wal}


def rewrite(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    timings = {}
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for table in dict.fromkeys(k.split(".")[0] for k in RULES):
            cols = [k.split(".")[1] for k in RULES if k.split(".")[0] == table]
            t1 = time.perf_counter()
            conn.execute(sql.SQL("UPDATE {} SET {}").format(sql.Identifier(table), sql.SQL(", ").join(
                sql.SQL("{c} = {c}").format(c=sql.Identifier(c)) for c in cols)))
            timings[table] = round(time.perf_counter() - t1, 3)
    return {"seconds": round(time.perf_counter() - t0, 3), "timings": timings}


def scalar(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    return row[0] if row else None


PLAIN_CONFIG = """
[tiers.production]
protected = true
"""

IMAGE_CONFIG = """
[project]
database = "{db}"

[tiers.production]
protected = true
sensitive = true

[tiers.staging]
parent = "production"
entry = true

[masking]
image = ["production"]
{rules}
"""


def changes(n: int, i: int) -> str:
    """Run ``i``'s writes on production: 1,000 scattered updates, 100 inserts, 100 deletes."""
    step, gap = max(1, n // 1000), max(1, n // 100)
    return f"""
UPDATE customer SET email = 'r{i}.' || customer_id || '@changed.example.com', first_name = 'Run{i}'
  WHERE customer_id % {step} = {i % step} AND customer_id <= {step * 1000};
INSERT INTO customer (customer_id, store_id, first_name, last_name, email, address_id, active)
  SELECT {n} + 1000 * {i + 1} + g, 1, 'New', 'Person', 'new.{i}.' || g || '@mail.example.com', 1 + g, 1
  FROM generate_series(1, 100) g;
DELETE FROM payment WHERE payment_id IN (SELECT payment_id FROM payment WHERE payment_id % {gap} = {(i + 7) % gap}
                                         ORDER BY payment_id LIMIT 100);
"""


def imaged(tb: Tierbase, db: str, runs: int, n: int) -> dict[str, Any]:
    """The platform's own path: a developer's masked branch of production, cloned from its masked image."""
    rules = "\n".join(f'"{k}" = "{v}"' for k, v in RULES.items())
    tb.apply_config(IMAGE_CONFIG.format(db=db, rules=rules), "bench")  # makes staging (and an image)
    t0 = time.perf_counter()
    tb.refresh_masked_images("production")  # this size's data
    first = time.perf_counter() - t0
    if not any(p["name"] == "benchdev" for p in tb.list_principals()):
        token = str(tb.create_principal("benchdev", "developer")["token"])
        tb._bench_token = token  # type: ignore[attr-defined]
    dev = tb.as_principal("benchdev", token=getattr(tb, "_bench_token", None))
    branch_s, refresh_s, freeze_s = [], [], []
    incremental: list[dict[str, Any]] = []
    for _ in range(runs):
        for _ in range(CLONES):  # a clone is cheap: several per image, so the p50 is of more than one
            branch_s.append(clone(tb, dev, db))
        t2 = time.perf_counter()
        whole = tb.refresh_masked_images("production", full=True)[0]
        refresh_s.append(time.perf_counter() - t2)
        freeze_s.append(float(whole.get("freeze_s") or 0))
        settle(tb)
        with psycopg.connect(admin(tb, "production", db), autocommit=True) as conn:
            conn.execute("SET search_path = public")
            conn.execute(changes(n, len(incremental)))
            conn.execute("CHECKPOINT")
        t3 = time.perf_counter()
        got = tb.refresh_masked_images("production")[0]
        took = time.perf_counter() - t3
        if got["mode"] != "incremental":
            raise RuntimeError(f"the refresh after row changes was not incremental: {got['why']}")
        incremental.append({"s": round(took, 2), "rows_remasked": got["rows_remasked"],
                            "rows_deleted": got["detail"]["rows_deleted"],
                            "diff_s": got["detail"].get("diff_seconds"), "apply_s": got["detail"].get("seconds"),
                            "freeze_s": got.get("freeze_s")})
        settle(tb)
    return {"imaged_s": [round(x, 3) for x in branch_s], "refresh_s": [round(x, 2) for x in refresh_s],
            "freeze_s": [round(x, 2) for x in freeze_s], "incremental": incremental,
            "first_config_s": round(first, 2)}


def clone(tb: Tierbase, dev: Tierbase, db: str) -> float:
    """One developer's masked branch of production, cloned from the image: create, start, first query
    (what `sample` times for the other kinds)."""
    name = f"mi-{secrets.token_hex(3)}"
    t1 = time.perf_counter()
    made = dev.create_branch(name, "production")
    tb.start_branch(name)
    with psycopg.connect(tb.branch_url(name, db, direct=True), connect_timeout=60) as conn:
        conn.execute("SELECT count(*) FROM customer").fetchone()
        took = time.perf_counter() - t1
        if scalar(conn, "SELECT count(*) FROM customer WHERE email LIKE %s", "%@mail.example.com") != 0:
            raise RuntimeError(f"customers still have their original e-mail on {name}")
    if "masked_image" not in made:
        raise RuntimeError(f"{name} was not cloned from the masked image: {made.get('parent')}")
    tb.delete_branch(name)
    settle(tb)
    return took


def measure(tb: Tierbase, n: int, runs: int) -> dict[str, Any]:
    db = f"mask{n}"
    db_bytes = load(tb, db, n)
    got: dict[str, list[dict[str, Any]]] = {"plain": [], "masked": [], "rewrite": []}
    for i in range(runs):
        for mode, samples in got.items():
            samples.append(sample(tb, db, mode))
        last = {m: got[m][-1] for m in got}
        log(f"  {n:,} run {i + 1}/{runs}: plain {last['plain']['total_s'] * 1000:.0f} ms; masked "
            f"{last['masked']['total_s']:.2f} s (masking {last['masked']['mask_s']:.2f} s, "
            f"{human_bytes(last['masked']['wal_bytes'])} WAL, {human_bytes(last['masked']['added_bytes'])} own); "
            f"rewrite alone {last['rewrite']['mask_s']:.2f} s")
    img = imaged(tb, db, runs, n)
    log(f"  {n:,} imaged: masked branch from the image {', '.join(f'{x * 1000:.0f} ms' for x in img['imaged_s'])}; "
        f"re-making the image {', '.join(f'{x:.2f} s' for x in img['refresh_s'])} (freezing "
        f"{', '.join(f'{x:.2f} s' for x in img['freeze_s'])}); incrementally after 1,200 "
        f"changed rows {', '.join(str(x['s']) + ' s' for x in img['incremental'])}")
    for b in tb.store.children("production"):  # staging and the images: the next size makes its own
        with contextlib.suppress(TierbaseError):
            tb.delete_branch(b.name, recursive=True)
    # and the platform as the next size starts it: production alone, not sensitive (plain branches stay plain)
    tb.apply_config(PLAIN_CONFIG, "bench")
    with psycopg.connect(tb.branch_url("production", direct=True), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    masked = got["masked"]
    rows = sum(masked[0]["tables"].values())
    mask_s = [float(m["mask_s"]) for m in masked]

    def p50(mode: str, key: str) -> float:
        return pct([float(x[key] or 0) for x in got[mode]], 0.5)

    return {
        "customers": n, "db_bytes": db_bytes, "runs": runs, "masked_rows": rows, "tables": masked[0]["tables"],
        "plain_ms_p50": round(p50("plain", "total_s") * 1000, 1),
        "plain_ms": [round(p["total_s"] * 1000, 1) for p in got["plain"]],
        "masked_s_p50": round(p50("masked", "total_s"), 2), "masked_s": [round(m["total_s"], 2) for m in masked],
        "mask_s_p50": round(p50("masked", "mask_s"), 2), "mask_s": mask_s,
        "rows_per_s": round(rows / p50("masked", "mask_s")),
        "table_s_p50": {t: round(pct([float(m["timings"][t]) for m in masked], 0.5), 3) for t in masked[0]["timings"]},
        "rewrite_s_p50": round(p50("rewrite", "mask_s"), 2), "rewrite_s": [r["mask_s"] for r in got["rewrite"]],
        "wal_bytes": int(p50("masked", "wal_bytes")), "rewrite_wal_bytes": int(p50("rewrite", "wal_bytes")),
        "added_bytes": int(p50("masked", "added_bytes")), "plain_added_bytes": int(p50("plain", "added_bytes")),
        "imaged_ms_p50": round(pct(img["imaged_s"], 0.5) * 1000, 1), "imaged_s": img["imaged_s"],
        "refresh_s_p50": round(pct(img["refresh_s"], 0.5), 2), "refresh_s": img["refresh_s"],
        "freeze_s_p50": round(pct(img["freeze_s"], 0.5), 2), "freeze_s": img["freeze_s"],
        "incremental_s_p50": round(pct([x["s"] for x in img["incremental"]], 0.5), 2),
        "incremental": img["incremental"],
        "imaged_vs_plain": round(pct(img["imaged_s"], 0.5) * 1000 / max(p50("plain", "total_s") * 1000, 1e-9), 2),
    }


def build_table(raw: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [[f"{r['customers']:,}", human_bytes(r["db_bytes"]), f"{r['masked_rows']:,}", r["plain_ms_p50"],
             r["masked_s_p50"], r.get("imaged_ms_p50", "-"), r.get("imaged_vs_plain", "-"), r.get("refresh_s_p50", "-"),
             r.get("freeze_s_p50", "-"), r.get("incremental_s_p50", "-"), r["mask_s_p50"],
             f"{r['rows_per_s']:,}", r["rewrite_s_p50"], human_bytes(r["wal_bytes"]), human_bytes(r["added_bytes"])]
            for r in raw]
    per_row = "; ".join(
        f"{r['customers']:,} customers: " + ", ".join(
            f"{t} {s:.2f} s ({s / max(r['tables'][t], 1) * 1e6:.1f} us/row)" for t, s in r["table_s_p50"].items())
        for r in raw)
    return {
        "title": TITLE,
        "columns": ["customers", "database", "masked rows", "create + start, no masking p50 (ms)",
                    "create + start + mask p50 (s)", "masked branch from the image p50 (ms)",
                    "masked (image) / unmasked branch", "re-making the image whole p50 (s)",
                    "of which freezing the masked tables p50 (s)",
                    "incremental refresh after 1,200 changed rows p50 (s)", "masking alone p50 (s)", "masked rows/s",
                    "same rows rewritten unmasked p50 (s)", "WAL written by masking",
                    "branch's own bytes after masking"],
        "rows": rows,
        "notes": [
            "'Masked branch from the image': a developer's branch of production made by the platform with "
            "`[masking] image = [\"production\"]` (create + start + first query): a clone of production's masked "
            "image, so nothing is masked per branch. Re-making the image (a masked branch of production, once per "
            "promotion, rule change or refresh) costs about one masking; the image holds production's data as of "
            "its last re-making (staleness = time since the last promotion or refresh).",
            f"Each image was cloned {CLONES} times (create + start + first query, a count(*) of customer). The "
            "image is frozen before it is cloned (VACUUM (FREEZE) of what masking rewrote, then a fast stop): "
            "unfrozen, each clone's first read set hint bits on and pruned every rewritten page, writing WAL and "
            "copying the pages (at 1M customers, 44k pages dirtied and 1.0 s of a 1.2 s clone); the freezing "
            "column is what that adds to re-making the image. Freezing after an incremental refresh (s): " + "; ".join(
                f"{r['customers']:,} customers: " + ", ".join(str(x.get("freeze_s")) for x in r.get("incremental", []))
                for r in raw) + ".",
            "Incremental refresh: after 1,000 scattered customer updates (e-mail and first name), 100 customer "
            "inserts and 100 payment deletes on production, the next image is a clone of the current one with only "
            "those rows re-masked (data diff of the image's unmasked source snapshot against a new one, then "
            "delete/upsert/mask by key in one transaction); it includes the two snapshots, their scratch computes, "
            "the diff and the new image's private compute. Per run (s, rows re-masked): " + "; ".join(
                f"{r['customers']:,} customers: " + ", ".join(
                    f"{x['s']} ({x['rows_remasked']})" for x in r.get("incremental", [])) for r in raw) + ".",
            "Rules: " + ", ".join(f"{k}={v}" for k, v in RULES.items()) + "; each size has N customers, N + 4 "
            "addresses and N payments (partitioned by month), so masked rows = 3N + 4.",
            "Both create columns include the branch's compute start and a first query; masking is one transaction "
            "(one UPDATE per table, then re-checks of keys on masked columns and ANALYZE of the masked tables).",
            "'Same rows rewritten unmasked' sets the masked columns to themselves in one transaction in replica "
            "mode: the floor any UPDATE-based masking pays (new row versions, index entries, WAL); the rest is "
            "the keyed hashing (HMAC-SHA256 in SQL) and the mask expressions.",
            f"Per table (p50): {per_row}.",
            "Masking alone, every run (s): " + "; ".join(
                f"{r['customers']:,} customers: " + ", ".join(f"{x:.1f}" for x in r["mask_s"]) for r in raw)
            + ". Other test suites shared this 2-core machine during the runs (see the load averages below).",
            "Masking rewrites every masked row (a new row version, and new index entries unless the update is "
            "HOT), so a masked branch stops sharing those tables' pages with its parent; its own bytes are the "
            "rewritten tables and indexes plus the WAL masking wrote (full-page images after the branch's "
            "checkpoint). An unmasked branch's own bytes after its first query: "
            + ", ".join(f"{r['customers']:,} customers {human_bytes(r['plain_added_bytes'])}" for r in raw) + ".",
        ],
    }


def targets(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13: a masked branch (a clone of the image) within 2x of an unmasked branch at 1M customers."""
    out = []
    for r in raw:
        if r["customers"] >= 1_000_000 and "imaged_vs_plain" in r:
            out.append({"target": f"masked branch from the image vs an unmasked branch, {r['customers']:,} customers",
                        "goal": f"<= {TARGET_RATIO:g}x", "measured": f"{r['imaged_vs_plain']}x ({r['imaged_ms_p50']} "
                        f"vs {r['plain_ms_p50']} ms p50)", "met": r["imaged_vs_plain"] <= TARGET_RATIO})
    return out


def machine() -> str:
    return f"{host.machine()}, {os.cpu_count()} cores, {host.system()} {host.release()}"


def on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--customers", default="100000,1000000", help="comma-separated sizes (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "masking.json")
    ap.add_argument("--no-report", action="store_true", help="do not render docs/benchmarks.md")
    ap.add_argument("--keep", action="store_true",
                    help="keep the --out file's results for the sizes not measured now (a size too long for one "
                         "sitting measured in another run); the meta says which run measured which size")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.customers.split(",") if x.strip()]
    if os.geteuid() != 0 or not shutil.which("mkfs.btrfs"):
        print("Error: bench/masking.py needs root and btrfs-progs: the platform loop-mounts a btrfs image. "
              "Run it with sudo after installing btrfs-progs.", file=sys.stderr)
        return 2
    if not PAGILA.exists():
        print(f"Error: the pagila schema is not at {PAGILA}. Check out the shared fixtures.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    started, load_at_start = time.time(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="tierbase-bench-masking-", dir="/tmp"))
    tmp.chmod(0o711)  # the unprivileged compute user must reach into it
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(tmp / "home")
    try:
        size = f"{max(4, math.ceil(max(sizes) / 1_000_000 * 8))}G"  # sparse: costs only what is written
        log(f"init a btrfs platform at {tmp} ({size})")
        tb.init(storage="btrfs", btrfs_size=size)
        tb.start_branch("production")
        raw: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        earlier: dict[str, Any] = {}
        if args.keep and args.out.exists():
            before = json.loads(args.out.read_text())
            kept = [r for r in before.get("raw", []) if r.get("customers") not in sizes]
            earlier = {f"{r['customers']:,} customers": before.get("meta", {}) for r in kept}
        version = subprocess.run([find_binaries()["postgres"], "--version"], capture_output=True,
                                 text=True).stdout.strip()

        def document() -> dict[str, Any]:
            every = sorted([*kept, *raw], key=lambda r: int(r["customers"]))
            return {
                "title": "Masking",
                "targets": targets(every),
                "tables": [build_table(every)],
                "meta": {
                    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                    "postgres": version, "duration_s": round(time.time() - started),
                    "cmd": shlex.join(["python", "bench/masking.py", *(
                        a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-report")]),
                    "requires": "root (loop-mounts a btrfs image); computes run as an unprivileged user",
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                    **({"note": "; ".join(f"{size}: measured by `{m.get('cmd')}` at {m.get('date')} (load average "
                                          f"{m.get('load_average_at_start')} at its start)" for size, m in
                                          earlier.items()) + "; the rest by this run"} if earlier else {}),
                },
                **({"kept": earlier} if earlier else {}),
                "raw": every,
            }

        for i, n in enumerate(sizes):
            log(f"{n:,} customers")
            raw.append(measure(tb, n, args.runs))
            if i < len(sizes) - 1:  # the sizes done so far, in case a later one is cut short
                write_results({**document(), "partial": f"sizes measured so far: {sizes[:i + 1]}"}, args.out,
                              report=False)
        doc = document()
        write_results(doc, args.out, report=not args.no_report)
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        log("tearing down the platform")
        try:
            for line in tb.down(purge=True):
                log(f"  {line}")
        except BaseException as err:
            log(f"  down --purge failed: {err!r}; check `grep {tmp} /proc/mounts` and `losetup -a`")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
