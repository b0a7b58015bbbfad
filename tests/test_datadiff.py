"""Row-level data diff on pagila: chunked key-range hashing, checked against a brute-force comparison.

A branch of production gets pagila's schema and generated rows (pagila's data file is not vendored),
plus a bytea-keyed table and a table without a primary key; a branch of that branch changes rows in
every way (insert, update, delete, in clusters and scattered) and the diff must name exactly the rows
that a full read of both sides finds.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import InvalidInput, PolicyDenied
from tierbase.migrate.datadiff import data_diff, shapes, stable_session

from .conftest import as_, make_principal, needs_root_btrfs

pytestmark = needs_root_btrfs
PAGILA = Path(__file__).resolve().parent / "fixtures" / "pagila" / "pagila-schema.sql"

SEED = [
    "INSERT INTO language (name) SELECT 'lang ' || g FROM generate_series(1, 6) g",
    "INSERT INTO country (country) SELECT 'country ' || g FROM generate_series(1, 100) g",
    "INSERT INTO city (city, country_id) SELECT 'city ' || g, 1 + g % 100 FROM generate_series(1, 600) g",
    "INSERT INTO address (address, district, city_id, phone) "
    "SELECT g || ' main st', 'district ' || g % 40, 1 + g % 600, '555-' || g FROM generate_series(1, 3000) g",
    "INSERT INTO actor (first_name, last_name) SELECT 'first' || g, 'last' || g FROM generate_series(1, 2000) g",
    "INSERT INTO film (title, description, language_id, special_features, rating) "
    "SELECT 'film ' || g, 'about ' || g, 1 + g % 6, ARRAY['Trailers', 'x' || g % 3], "
    "(ARRAY['G','PG','R']::mpaa_rating[])[1 + g % 3] FROM generate_series(1, 5000) g",
    "INSERT INTO film_actor (actor_id, film_id) SELECT 1 + g % 2000, 1 + (g * 7) % 5000 "
    "FROM generate_series(1, 20000) g ON CONFLICT DO NOTHING",
    "CREATE TABLE blobs (k bytea PRIMARY KEY, v text, n numeric)",
    "INSERT INTO blobs SELECT decode(md5(g::text), 'hex'), 'v' || g, g / 7.0 FROM generate_series(1, 3000) g",
    # a column named like the diff's table alias: the row is still the row, not that column
    "CREATE TABLE stamps (t timestamptz PRIMARY KEY, v numeric)",
    "INSERT INTO stamps SELECT '2026-01-01'::timestamptz + g * interval '1 hour', g FROM generate_series(1, 300) g",
    "CREATE TABLE nopk (x int, y text)",
    "INSERT INTO nopk SELECT g, 'y' || g FROM generate_series(1, 500) g",
]

CHANGES = [
    # scattered updates, a cluster of deletes, inserts past the end and in the middle of the key space
    "UPDATE actor SET last_name = 'changed' WHERE actor_id % 97 = 0",
    "DELETE FROM film_actor WHERE actor_id BETWEEN 300 AND 320",
    "INSERT INTO film_actor (actor_id, film_id) VALUES (1, 1), (2000, 4999), (1000, 3) ON CONFLICT DO NOTHING",
    "INSERT INTO actor (first_name, last_name) SELECT 'new', 'actor' || g FROM generate_series(1, 1500) g",
    "DELETE FROM address WHERE address_id IN (5, 1777, 2999)",
    "UPDATE address SET address2 = 'apt 1' WHERE address_id = 42",
    "UPDATE film SET special_features = ARRAY['Deleted Scenes'] WHERE film_id IN (1, 2500, 5000)",
    "UPDATE blobs SET v = NULL WHERE k = decode(md5('17'), 'hex')",
    "DELETE FROM blobs WHERE k = decode(md5('18'), 'hex')",
    "INSERT INTO blobs VALUES ('\\x00'::bytea, 'zero', 0), ('\\xffff'::bytea, 'max', 1)",
    "UPDATE nopk SET y = 'changed' WHERE x = 7",
    "UPDATE stamps SET v = 'NaN' WHERE v = 5", "UPDATE stamps SET v = -v WHERE v BETWEEN 100 AND 110",
    "ALTER TABLE city ADD COLUMN population int",
]


def run(url: str, statements: list[str]) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for stmt in statements:
            conn.execute(stmt.encode())


@pytest.fixture(scope="module")
def pair(platform: Tierbase) -> Iterator[tuple[str, str]]:
    base, feat = f"dd-{secrets.token_hex(3)}", f"dd-{secrets.token_hex(3)}"
    platform.create_branch(base)
    try:
        platform.import_dump(str(PAGILA), base, "postgres")
        run(platform.branch_url(base, direct=True), SEED)
        platform.create_branch(feat, base)
        run(platform.branch_url(feat, direct=True), CHANGES)
        yield base, feat
    finally:
        platform.delete_branch(base, recursive=True)


def brute_force(url_a: str, url_b: str, table: str, pk: list[str]) -> dict[str, set[str]]:
    """Every row of both sides, matched by key in Python."""
    def rows(url: str) -> dict[str, str]:
        with psycopg.connect(url, autocommit=True) as conn:
            stable_session(conn)
            keys = ", ".join(pk)
            got = conn.execute(f"SELECT jsonb_build_array({keys})::text, to_jsonb(x.*)::text FROM public.{table} x")
            return dict(got.fetchall())  # type: ignore[arg-type]
    a, b = rows(url_a), rows(url_b)
    return {"inserted": {k for k in b if k not in a}, "deleted": {k for k in a if k not in b},
            "updated": {k for k in a if k in b and a[k] != b[k]}}


def keys_of(rows: list[dict[str, Any]], pk: list[str]) -> set[str]:
    return {json.dumps([r[k] for k in pk], separators=(", ", ": ")) for r in rows}


def test_data_diff_is_exact_against_brute_force(platform: Tierbase, pair: tuple[str, str]) -> None:
    base, feat = pair
    url_a, url_b = platform.branch_url(base, direct=True), platform.branch_url(feat, direct=True)
    with psycopg.connect(url_a, autocommit=True) as ca, psycopg.connect(url_b, autocommit=True) as cb:
        # small chunks and leaves so that every table recurses several levels
        d = data_diff(ca, cb, a_label=base, b_label=feat, chunk=500, leaf=16)
        pks = {name: list(s.pk) for name, s in shapes(ca).items()}
    by_table = {t.table: t for t in d.tables}
    for name in ("public.actor", "public.film_actor", "public.address", "public.film", "public.blobs",
                 "public.language", "public.country", "public.seed", "public.stamps"):
        pk = pks[name]
        want = brute_force(url_a, url_b, name.split(".", 1)[1], pk)
        t = by_table[name]
        assert keys_of(t.inserted, pk) == want["inserted"], name
        assert keys_of(t.deleted, pk) == want["deleted"], name
        assert keys_of([after for _, after in t.updated], pk) == want["updated"], name
        assert t.status == ("differs" if any(want.values()) else "same"), name
    actor = by_table["public.actor"]
    assert len(actor.inserted) == 1500 and len(actor.updated) == 20 and not actor.deleted
    assert {r["last_name"] for _, r in actor.updated} == {"changed"}
    assert len(by_table["public.film_actor"].deleted) > 0
    assert len(by_table["public.blobs"].inserted) == 2 and by_table["public.blobs"].inserted[0]["k"] == "\\x00"
    assert by_table["public.nopk"].status == "no-primary-key"
    assert len(by_table["public.stamps"].updated) == 12
    assert by_table["public.city"].status == "shape-differs" and "+population" in by_table["public.city"].note
    # the rows moved grow with the differences, not with the tables: far less than reading every row
    assert d.stats["rows_compared"] > 0 and d.stats["bytes_moved"] < 2_000_000


def test_data_diff_sql_makes_a_equal_to_b(platform: Tierbase, pair: tuple[str, str]) -> None:
    base, feat = pair
    out = platform.data_diff(base, feat, table=["actor", "film_actor", "blobs", "address"], fmt="sql")
    assert out["from"] == base and out["to"] == feat and not out["empty"]
    copy = f"dd-{secrets.token_hex(3)}"
    platform.create_branch(copy, base)
    try:
        # pagila's last_updated triggers would stamp every upserted row with now(): the script is data
        # only, so the test runs it the way the platform's replay does, without user triggers
        run(platform.branch_url(copy, direct=True),
            [f"ALTER TABLE {t} DISABLE TRIGGER USER" for t in ("actor", "address")] + [out["text"]])
        again = platform.data_diff(copy, feat, table=["actor", "film_actor", "blobs", "address"], fmt="json")
        assert again["empty"] is True, [(t["table"], t["updated"]) for t in again["tables"]]
    finally:
        platform.delete_branch(copy)


def test_data_diff_text_and_json(platform: Tierbase, pair: tuple[str, str]) -> None:
    base, feat = pair
    text = platform.data_diff(base, feat)["text"]
    assert "public.actor: +1500 inserted, ~20 updated, -0 deleted" in text
    assert "public.nopk: no-primary-key" in text and "public.city: shape-differs" in text
    js = platform.data_diff(base, feat, table=["public.address"], fmt="json")
    assert [t["table"] for t in js["tables"]] == ["public.address"]
    assert js["tables"][0]["counts"] == {"inserted": 0, "updated": 1, "deleted": 3}
    assert js["stats"]["bytes_moved"] > 0 and js["text"] is None


def test_data_diff_refuses_what_it_cannot_compare(platform: Tierbase, pair: tuple[str, str]) -> None:
    base, _ = pair
    with pytest.raises(InvalidInput, match="same branch"):
        platform.data_diff(base, base)
    with pytest.raises(InvalidInput, match="format 'markdown' is unknown"):
        platform.data_diff(base, "production", fmt="markdown")
    with pytest.raises(InvalidInput, match="read-only snapshot"):
        snap = f"dd-snap-{secrets.token_hex(3)}"
        platform.create_branch(snap, base, snapshot=True)
        try:
            platform.data_diff(base, snap)
        finally:
            platform.delete_branch(snap)


def test_data_diff_needs_the_right_to_read_both(platform: Tierbase, pair: tuple[str, str]) -> None:
    """An agent may not read production's rows through a diff any more than through the proxy."""
    base, _ = pair
    name = f"ddbot{secrets.token_hex(2)}"
    make_principal(platform, name, "agent")
    bot = as_(platform, name)
    with pytest.raises(PolicyDenied):
        bot.data_diff(base, "production")
    assert platform.gate.audit.query(actor=name)[-1]["decision"] == "denied"
