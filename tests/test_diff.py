"""Schema diff on pagila: snapshot from the catalogs, diff two branches, render text/markdown/JSON.

pagila's schema is restored into a database of its own on production; each
scenario branches production (copy-on-write, with that database), changes the
schema on the branch and compares it with production.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import ComputeError
from tierbase.migrate.diff import Change, SchemaDiff, diff, diff_urls, snapshot, snapshot_url

from .conftest import drop_database, free_port

PAGILA = Path(__file__).resolve().parent / "fixtures" / "pagila" / "pagila-schema.sql"

pytestmark = pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")

SALES_BY_STORE = """
CREATE OR REPLACE VIEW public.sales_by_store AS
 SELECT ((c.city || ','::text) || cy.country) AS store,
    ((m.first_name || ' '::text) || m.last_name) AS manager,
    sum(p.amount) AS total_sales
   FROM (((((((public.payment p
     JOIN public.rental r ON ((p.rental_id = r.rental_id)))
     JOIN public.inventory i ON ((r.inventory_id = i.inventory_id)))
     JOIN public.store s ON ((i.store_id = s.store_id)))
     JOIN public.address a ON ((s.address_id = a.address_id)))
     JOIN public.city c ON ((a.city_id = c.city_id)))
     JOIN public.country cy ON ((c.country_id = cy.country_id)))
     JOIN public.staff m ON ((s.manager_staff_id = m.staff_id)))
  WHERE p.amount > 0
  GROUP BY cy.country, c.city, s.store_id, m.first_name, m.last_name
  ORDER BY cy.country, c.city
"""

# One statement per kind of change, and the (kind, op, name) each must show up as.
CHANGES = [
    "ALTER TABLE public.customer ADD COLUMN loyalty_tier text NOT NULL DEFAULT 'basic'",
    "ALTER TABLE public.customer ALTER COLUMN email TYPE varchar(255)",
    "ALTER TABLE public.staff DROP COLUMN picture",
    # a new table, with parts of every kind: all of it is one change
    """CREATE TABLE public.loyalty_program (
           id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
           code text NOT NULL UNIQUE CHECK (code <> ''),
           customer_id integer REFERENCES public.customer (customer_id),
           position serial)""",
    "CREATE INDEX loyalty_program_customer_idx ON public.loyalty_program (customer_id)",
    "CREATE TRIGGER last_updated BEFORE UPDATE ON public.loyalty_program "
    "FOR EACH ROW EXECUTE FUNCTION public.last_updated()",
    "DROP INDEX public.idx_actor_last_name",
    "CREATE INDEX idx_rental_return_date ON public.rental (return_date)",
    "ALTER TABLE public.film ADD CONSTRAINT film_length_positive CHECK (length > 0)",
    "ALTER TABLE public.store ADD CONSTRAINT store_manager_staff_id_fkey "
    "FOREIGN KEY (manager_staff_id) REFERENCES public.staff (staff_id)",
    SALES_BY_STORE,
    "CREATE FUNCTION public.film_count() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM public.film'",
    """CREATE OR REPLACE FUNCTION public.last_day(timestamp with time zone) RETURNS date
       LANGUAGE sql IMMUTABLE STRICT
       AS $$ SELECT (date_trunc('month', $1) + interval '1 month' - interval '1 day')::date $$""",
    "CREATE TRIGGER film_touch BEFORE UPDATE ON public.film FOR EACH ROW EXECUTE FUNCTION public.last_updated()",
    "ALTER SEQUENCE public.actor_actor_id_seq INCREMENT BY 10",
    "ALTER TYPE public.mpaa_rating ADD VALUE 'NC-18'",
    "CREATE DOMAIN public.email_address AS text CHECK (VALUE ~ '@')",
    "CREATE SCHEMA reporting",
    # tierbase's own migration ledger is never part of a schema diff
    "CREATE SCHEMA tierbase",
    "CREATE TABLE tierbase.ledger (version text PRIMARY KEY, applied_at timestamptz DEFAULT now())",
]

EXPECTED = {
    ("column", "added", "public.customer.loyalty_tier"),
    ("column", "changed", "public.customer.email"),
    ("column", "removed", "public.staff.picture"),
    ("table", "added", "public.loyalty_program"),
    ("index", "removed", "public.idx_actor_last_name"),
    ("index", "added", "public.idx_rental_return_date"),
    ("constraint", "added", "public.film.film_length_positive"),
    ("constraint", "added", "public.store.store_manager_staff_id_fkey"),
    ("view", "changed", "public.sales_by_store"),
    ("function", "added", "public.film_count()"),
    ("function", "changed", "public.last_day(timestamp with time zone)"),
    ("trigger", "added", "public.film.film_touch"),
    ("sequence", "changed", "public.actor_actor_id_seq"),
    ("type", "changed", "public.mpaa_rating"),
    ("type", "added", "public.email_address"),
    ("schema", "added", "reporting"),
}

OTHER_CHANGES = [
    "CREATE EXTENSION citext",  # its functions and types are the extension's, not listed one by one
    "CREATE EXTENSION btree_gist",
    "CREATE TYPE public.price_range AS RANGE (subtype = numeric)",  # with constructors and a multirange
    "CREATE TYPE public.address_t AS (street text, zip varchar(10))",
    """CREATE TABLE public.booking (
           id int GENERATED BY DEFAULT AS IDENTITY (START 100 INCREMENT 5),
           store_id int NOT NULL,
           during tstzrange NOT NULL,
           price numeric,
           total numeric GENERATED ALWAYS AS (price * 2) STORED,
           label text COLLATE "C",
           addr public.address_t,
           email public.citext,
           EXCLUDE USING gist (store_id WITH =, during WITH &&))""",
    "CREATE UNLOGGED TABLE public.scratch (x int)",
    "CREATE TABLE public.actor_archive () INHERITS (public.actor)",
    "ALTER TABLE public.actor ADD COLUMN nickname text",  # the inheriting table gets it too
    "ALTER TABLE public.customer ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE public.film DISABLE TRIGGER film_fulltext_trigger",
    "CREATE PROCEDURE public.noop() LANGUAGE sql AS 'SELECT 1'",
    "CREATE SEQUENCE public.ticket_seq AS smallint CYCLE",
    "CREATE CONSTRAINT TRIGGER film_check AFTER INSERT ON public.film DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW EXECUTE FUNCTION public.last_updated()",
    "CREATE MATERIALIZED VIEW public.film_titles AS SELECT title FROM public.film",
    "CREATE INDEX film_titles_title ON public.film_titles (title)",
    "ALTER VIEW public.staff_list SET (security_barrier = true)",
    "DROP VIEW public.actor_info",
]

OTHER_EXPECTED = {
    ("extension", "added", "citext"),
    ("extension", "added", "btree_gist"),
    ("type", "added", "public.price_range"),
    ("type", "added", "public.address_t"),
    ("table", "added", "public.booking"),
    ("table", "added", "public.scratch"),
    ("table", "added", "public.actor_archive"),
    ("column", "added", "public.actor.nickname"),
    ("table", "changed", "public.customer"),
    ("trigger", "changed", "public.film.film_fulltext_trigger"),
    ("trigger", "added", "public.film.film_check"),
    ("function", "added", "public.noop()"),
    ("sequence", "added", "public.ticket_seq"),
    ("view", "added", "public.film_titles"),
    ("view", "changed", "public.staff_list"),
    ("view", "removed", "public.actor_info"),
}

PARTITION_CHANGES = [
    "CREATE TABLE public.payment_p2022_08 PARTITION OF public.payment "
    "FOR VALUES FROM ('2022-08-01 00:00:00+00') TO ('2022-09-01 00:00:00+00')",
    "ALTER TABLE public.payment ADD COLUMN note text",  # every partition gets it too
    "CREATE INDEX payment_note_idx ON public.payment (note)",  # and an index of its own
    "ALTER TABLE public.payment ALTER COLUMN amount SET DEFAULT 0",
    "ALTER TABLE public.payment ADD CONSTRAINT payment_amount_nonnegative CHECK (amount >= 0)",
    "DROP TABLE public.payment_p2022_07",
    # cloned onto every partition by postgres (conparentid, tgparentid): listed once, on the parent
    "ALTER TABLE public.payment ADD CONSTRAINT payment_customer_fk FOREIGN KEY (customer_id) "
    "REFERENCES public.customer (customer_id)",
    "CREATE TRIGGER payment_touch BEFORE UPDATE ON public.payment FOR EACH ROW EXECUTE FUNCTION public.last_updated()",
    # adopts the partitions' equal indexes (and their FKs above) rather than making new ones
    "CREATE INDEX payment_customer_idx ON public.payment (customer_id)",
]

PARTITION_EXPECTED = {
    ("table", "added", "public.payment_p2022_08"),
    ("table", "removed", "public.payment_p2022_07"),
    ("column", "added", "public.payment.note"),
    ("column", "changed", "public.payment.amount"),
    ("index", "added", "public.payment_note_idx"),
    ("constraint", "added", "public.payment.payment_amount_nonnegative"),
    ("constraint", "added", "public.payment.payment_customer_fk"),
    ("trigger", "added", "public.payment.payment_touch"),
    ("index", "added", "public.payment_customer_idx"),
}


def ops(d: SchemaDiff) -> set[tuple[str, str, str]]:
    return {(c.kind, c.op, c.name) for c in d.changes}


def find(d: SchemaDiff, kind: str, name: str) -> Change:
    return next(c for c in d.changes if c.kind == kind and c.name == name)


def take_snapshot(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return snapshot(conn)


def run(url: str, statements: list[str]) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for sql in statements:
            conn.execute(sql.encode())  # bytes: fixed DDL, not a parameterised query


@pytest.fixture(scope="module")
def pagila(platform: Tierbase) -> Iterator[str]:
    """The name of a database on production holding pagila's schema."""
    db = f"pagila_diff_{secrets.token_hex(3)}"
    platform.import_dump(str(PAGILA), "production", db)
    yield db
    drop_database(platform.branch_url("production", direct=True), db)


@pytest.fixture(scope="module")
def prod(platform: Tierbase, pagila: str) -> dict[str, Any]:
    return take_snapshot(platform.branch_url("production", pagila, direct=True))


def changed_branch(platform: Tierbase, db: str, statements: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = f"diff-{secrets.token_hex(3)}"
    platform.create_branch(name)
    try:
        url = platform.branch_url(name, db, direct=True)
        run(url, statements)
        yield name, take_snapshot(url)
    finally:
        platform.delete_branch(name, recursive=True)


@pytest.fixture(scope="module")
def feature(platform: Tierbase, pagila: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from changed_branch(platform, pagila, CHANGES)


@pytest.fixture(scope="module")
def partitioned(platform: Tierbase, pagila: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from changed_branch(platform, pagila, PARTITION_CHANGES)


def test_snapshot_describes_pagila_from_the_catalogs(prod: dict[str, Any]) -> None:
    assert json.loads(json.dumps(prod)) == prod
    assert json.dumps(prod) == json.dumps(prod, sort_keys=True)  # keys are stable all the way down
    assert set(prod["schemas"]) == {"public"}
    tables, columns = prod["tables"], prod["tables"]["public.customer"]["columns"]
    assert columns["customer_id"] == {"type": "integer", "not_null": True, "identity": None, "generated": None,
                                      "collation": None,
                                      "default": "nextval('public.customer_customer_id_seq'::regclass)"}
    assert tables["public.film"]["columns"]["rating"]["type"] == "public.mpaa_rating"
    assert tables["public.film"]["columns"]["release_year"]["type"] == "public.year"
    assert prod["constraints"]["public.actor.actor_pkey"] == {
        "table": "public.actor", "type": "primary key", "definition": "PRIMARY KEY (actor_id)", "inherited": False}
    assert prod["indexes"]["public.idx_title"]["definition"] == \
        "CREATE INDEX idx_title ON public.film USING btree (title)"
    assert "public.actor_pkey" not in prod["indexes"]  # the constraint says it
    assert prod["views"]["public.rental_by_category"]["kind"] == "materialized view"
    assert prod["indexes"]["public.rental_category"]["table"] == "public.rental_by_category"
    assert prod["views"]["public.actor_info"]["kind"] == "view"
    fn = prod["functions"]["public.last_day(timestamp with time zone)"]
    assert fn["kind"] == "function" and fn["returns"] == "date" and "CREATE OR REPLACE FUNCTION" in fn["definition"]
    agg = prod["functions"]["public.group_concat(text)"]
    assert agg["kind"] == "aggregate" and "SFUNC = public._group_concat" in agg["definition"]
    # one trigger name on many tables: the table qualifies it
    assert {n for n in prod["triggers"] if n.endswith(".last_updated")} >= {"public.actor.last_updated",
                                                                             "public.film.last_updated"}
    assert prod["sequences"]["public.actor_actor_id_seq"] == {
        "type": "bigint", "start": 1, "increment": 1, "min": 1, "max": 2**63 - 1, "cache": 1, "cycle": False,
        "unlogged": False, "owned_by": None}  # pagila's sequences are free-standing
    types = prod["types"]
    assert types["public.mpaa_rating"] == {"kind": "enum", "labels": ["G", "PG", "PG-13", "R", "NC-17"]}
    assert types["public.year"]["constraints"] == {"year_check": "CHECK (((VALUE >= 1901) AND (VALUE <= 2155)))"}
    assert types['public."b\u0131g\u0131nt"']["base"] == "bigint"
    assert not any(n.startswith("public._") for n in types)  # no array types


def test_snapshot_handles_partitioned_tables(prod: dict[str, Any]) -> None:
    tables = prod["tables"]
    assert tables["public.payment"]["kind"] == "partitioned table"
    assert tables["public.payment"]["partition_key"] == "RANGE (payment_date)"
    parts = sorted(n for n, t in tables.items() if t["partition_of"] == "public.payment")
    assert parts == [f"public.payment_p2022_0{m}" for m in range(1, 8)]
    assert tables["public.payment_p2022_01"]["partition_bound"] == \
        "FOR VALUES FROM ('2022-01-01 00:00:00+00') TO ('2022-02-01 00:00:00+00')"
    assert tables["public.payment_p2022_01"]["inherits"] == []
    # the primary key cloned onto each partition is marked as the parent's
    assert prod["constraints"]["public.payment.payment_pkey"]["definition"] == \
        "PRIMARY KEY (payment_date, payment_id)"
    cloned = {n for n, c in prod["constraints"].items() if c["inherited"]}
    assert cloned == {f"public.payment_p2022_0{m}.payment_p2022_0{m}_pkey" for m in range(1, 8)}
    assert prod["constraints"]["public.payment_p2022_01.payment_p2022_01_customer_id_fkey"]["type"] == "foreign key"


def test_equal_schemas_diff_empty(platform: Tierbase, pagila: str, prod: dict[str, Any]) -> None:
    url = platform.branch_url("production", pagila, direct=True)
    assert take_snapshot(url) == prod  # twice the same
    assert diff(prod, prod).empty
    # an untouched branch, and the same dump restored into another database (other oids): no changes
    name = f"diff-{secrets.token_hex(3)}"
    platform.create_branch(name)
    twin = f"{pagila}_twin"
    try:
        untouched = diff_urls(url, platform.branch_url(name, pagila, direct=True), a_label="production", b_label=name)
        assert untouched.empty, untouched.to_text()
        platform.import_dump(str(PAGILA), "production", twin)
        other = diff(prod, take_snapshot(platform.branch_url("production", twin, direct=True)))
        assert other.empty, other.to_text()
    finally:
        platform.delete_branch(name, recursive=True)
        drop_database(platform.branch_url("production", direct=True), twin)
    assert untouched.to_markdown() == f"### Schema diff: production -> {name}\n\nNo schema changes.\n"
    assert "No schema changes." in untouched.to_text()
    assert untouched.to_dict() == {"a": "production", "b": name, "empty": True,
                                   "counts": {"added": 0, "removed": 0, "changed": 0}, "changes": []}


def test_diff_lists_exactly_the_changes(prod: dict[str, Any], feature: tuple[str, dict[str, Any]]) -> None:
    name, snap = feature
    d = diff(prod, snap, a_label="production", b_label=name)
    assert ops(d) == EXPECTED, d.to_text()
    assert len(d.changes) == len(EXPECTED)
    assert "tierbase" not in snap["schemas"] and "tierbase.ledger" not in snap["tables"]

    email = find(d, "column", "public.customer.email")
    assert (email.before["type"], email.after["type"]) == ("text", "character varying(255)")
    assert email.details == "type: text -> character varying(255)"
    tier = find(d, "column", "public.customer.loyalty_tier")
    assert tier.before is None and tier.after["default"] == "'basic'::text" and tier.after["not_null"]
    assert tier.details == "text not null default 'basic'::text"
    assert find(d, "column", "public.staff.picture").before["type"] == "bytea"
    table = find(d, "table", "public.loyalty_program")
    assert list(table.after["columns"]) == ['"position"', "code", "customer_id", "id"]  # quoted: a keyword
    assert table.after["columns"]["id"]["identity"]["generation"] == "always"
    # its serial's sequence is in the snapshot (owned by the column), the identity's is part of the column
    assert snap["sequences"]["public.loyalty_program_position_seq"]["owned_by"] == ["public.loyalty_program",
                                                                                    '"position"']
    assert not any(n.startswith("public.loyalty_program_id") for n in snap["sequences"])
    seq = find(d, "sequence", "public.actor_actor_id_seq")
    assert (seq.before["increment"], seq.after["increment"]) == (1, 10)
    assert seq.details == "increment: 1 -> 10"
    assert find(d, "type", "public.mpaa_rating").details == "labels: +NC-18"
    assert find(d, "type", "public.email_address").details == "domain over text CHECK ((VALUE ~ '@'::text))"
    assert find(d, "view", "public.sales_by_store").details == "definition changed"
    assert find(d, "constraint", "public.store.store_manager_staff_id_fkey").details == \
        "FOREIGN KEY (manager_staff_id) REFERENCES public.staff(staff_id)"
    assert find(d, "function", "public.film_count()").details == "function () returns bigint language sql"
    assert find(d, "trigger", "public.film.film_touch").details.startswith("CREATE TRIGGER film_touch BEFORE UPDATE")


def test_reverse_diff_inverts_added_and_removed(prod: dict[str, Any], feature: tuple[str, dict[str, Any]]) -> None:
    name, snap = feature
    forward = diff(prod, snap, a_label="production", b_label=name)
    back = diff(snap, prod, a_label=name, b_label="production")
    flip = {"added": "removed", "removed": "added", "changed": "changed"}
    assert ops(back) == {(kind, flip[op], obj) for kind, op, obj in ops(forward)}
    for c in forward.changes:
        r = find(back, c.kind, c.name)
        assert (r.before, r.after) == (c.after, c.before)
    assert find(back, "table", "public.loyalty_program").op == "removed"


def test_text_markdown_and_json(prod: dict[str, Any], feature: tuple[str, dict[str, Any]]) -> None:
    name, snap = feature
    d = diff(prod, snap, a_label="production", b_label=name)

    text = d.to_text()
    assert text.startswith(f"Schema diff: production -> {name}\n16 changes: 9 added, 2 removed, 5 changed\n")
    assert "+ column public.customer.loyalty_tier text not null default 'basic'::text" in text
    assert "~ column public.customer.email type: text -> character varying(255)" in text
    assert "- index public.idx_actor_last_name CREATE INDEX idx_actor_last_name" in text
    assert text.index("+ schema reporting") < text.index("+ table") < text.index("~ view")  # grouped by kind

    md = d.to_markdown()
    assert md.startswith(f"### Schema diff: production -> {name}\n\n**16 changes:** 9 added, 2 removed, 5 changed")
    for heading in ("Schemas (1)", "Types (2)", "Sequences (1)", "Tables (1)", "Columns (3)", "Constraints (2)",
                    "Indexes (2)", "Views (1)", "Functions (2)", "Triggers (1)"):
        assert f"\n#### {heading}\n\n| op | object | details |\n| --- | --- | --- |\n" in md
    assert "| + added | `public.customer.loyalty_tier` | `text not null default 'basic'::text` |" in md
    assert "| ~ changed | `public.customer.email` | `type: text -> character varying(255)` |" in md
    assert "| - removed | `public.staff.picture` | `bytea` |" in md
    assert "| ~ changed | `public.sales_by_store` | `definition changed` |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| + ", "| - ", "| ~ "))]
    assert len(rows) == len(d.changes)
    assert all(line.count(" | ") == 2 and line.endswith(" |") for line in rows)  # no stray pipes
    # the changed definitions, as collapsed diffs a reviewer can read
    assert "<details><summary>Changed definitions</summary>" in md and md.rstrip().endswith("</details>")
    assert "```diff" in md and "+  WHERE p.amount > 0::numeric" in md
    assert md.count("```") % 2 == 0

    verbose = d.to_text(definitions=True)
    assert "~ view public.sales_by_store definition changed\n    --- production\n" in verbose
    assert "    +  WHERE p.amount > 0::numeric" in verbose

    payload = d.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert payload["counts"] == {"added": 9, "removed": 2, "changed": 5}
    assert {(c["kind"], c["op"], c["name"]) for c in payload["changes"]} == EXPECTED
    assert all(set(c) == {"kind", "op", "name", "before", "after", "details"} for c in payload["changes"])


def test_partitioned_table_changes_are_listed_once(
        prod: dict[str, Any], partitioned: tuple[str, dict[str, Any]]) -> None:
    name, snap = partitioned
    d = diff(prod, snap, a_label="production", b_label=name)
    assert ops(d) == PARTITION_EXPECTED, d.to_text()
    added = find(d, "table", "public.payment_p2022_08")
    assert added.details == \
        "partition of public.payment FOR VALUES FROM ('2022-08-01 00:00:00+00') TO ('2022-09-01 00:00:00+00')"
    # postgres cloned the column, index and check onto every partition; the snapshot knows, the diff says it once
    assert snap["tables"]["public.payment_p2022_01"]["columns"]["note"]["type"] == "text"
    assert find(d, "column", "public.payment.amount").details == "default: none -> 0"
    fkey = "public.payment_p2022_01.payment_p2022_01_customer_id_fkey"  # the partition's own, now adopted
    assert snap["constraints"][fkey]["inherited"] and not prod["constraints"][fkey]["inherited"]
    assert sum(1 for i in snap["indexes"].values() if i["inherited"] and "(customer_id)" in i["definition"]) == 7
    back = diff(snap, prod)
    assert ("table", "added", "public.payment_p2022_07") in ops(back)
    assert ("column", "removed", "public.payment.note") in ops(back)
    assert len(back.changes) == len(PARTITION_EXPECTED)


def test_other_kinds_of_objects(platform: Tierbase, pagila: str, prod: dict[str, Any]) -> None:
    [(name, snap)] = list(changed_branch(platform, pagila, OTHER_CHANGES))  # runs to the end: branch deleted
    d = diff(prod, snap, a_label="production", b_label=name)
    assert ops(d) == OTHER_EXPECTED, d.to_text()
    booking = snap["tables"]["public.booking"]["columns"]
    assert booking["id"]["identity"] == {"generation": "by default", "type": "integer", "start": 100,
                                         "increment": 5, "min": 1, "max": 2147483647, "cache": 1, "cycle": False}
    assert booking["total"]["generated"] == "(price * (2)::numeric)" and booking["total"]["default"] is None
    assert booking["label"]["collation"] == 'pg_catalog."C"'
    assert booking["email"]["type"] == "public.citext"
    assert snap["constraints"]["public.booking.booking_store_id_during_excl"]["type"] == "exclusion"
    assert snap["tables"]["public.scratch"]["unlogged"] is True
    assert snap["tables"]["public.actor_archive"]["inherits"] == ["public.actor"]
    assert snap["types"]["public.address_t"]["attributes"] == ["street text", "zip character varying(10)"]
    assert snap["types"]["public.price_range"] == {"kind": "range", "subtype": "numeric"}
    assert snap["functions"]["public.noop()"]["kind"] == "procedure"
    assert snap["views"]["public.film_titles"]["kind"] == "materialized view"
    assert find(d, "table", "public.customer").details == "row_security: none -> enabled"
    assert find(d, "trigger", "public.film.film_fulltext_trigger").details == "enabled: enabled -> disabled"
    assert find(d, "view", "public.staff_list").details == "options: +security_barrier=true"
    assert find(d, "extension", "citext").details.startswith("version ")
    assert find(d, "sequence", "public.ticket_seq").details == "smallint start 1 increment 1"
    assert json.loads(json.dumps(d.to_dict())) == d.to_dict()


def test_snapshot_leaves_the_session_as_it_was(platform: Tierbase, pagila: str, prod: dict[str, Any]) -> None:
    url = platform.branch_url("production", pagila, direct=True)
    with psycopg.connect(url, connect_timeout=10) as conn:  # not autocommit: inside the caller's transaction
        conn.execute("SET search_path = public")
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute("SELECT 1")
        assert snapshot(conn) == prod
        assert conn.execute("SHOW search_path").fetchone() == ("public",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Kolkata",)
        conn.rollback()
        assert snapshot(conn) == prod  # idle, not autocommit: its own transaction, committed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    only = snapshot_url(url, "production", schemas=["public"])
    assert only == prod
    assert snapshot_url(url, "production", schemas=["nowhere"])["tables"] == {}


def test_unreachable_database_is_a_clear_error() -> None:
    url = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(ComputeError, match=r"could not read the schema of 'gone'") as info:
        diff_urls(url, url, a_label="gone", b_label="gone")
    assert "secret" not in str(info.value)
    assert re.search(r"Check that the branch", info.value.hint)


def test_markdown_fits_one_pr_comment() -> None:
    body = "SELECT " + ", ".join(f"c{i}" for i in range(400))
    changes = [Change("view", "changed", f"public.v{i:04d}", {"definition": body}, {"definition": body + " x"})
               for i in range(300)]
    changes += [Change("column", "added", f"public.t.c{i:04d}", None, {"type": "text"}) for i in range(2000)]
    d = SchemaDiff("staging", "ci-pr-7", changes)
    md = d.to_markdown()
    assert len(md) <= 60_000
    assert "Changed definitions left out" in md or "more changes and the changed definitions left out" in md
    assert "<details>" not in md
    shown = sum(1 for line in md.splitlines() if line.startswith("| + ") or line.startswith("| ~ "))
    assert f"_{len(changes) - shown} more changes" in md
    assert "run `tierbase diff staging ci-pr-7`" in md
    small = SchemaDiff("staging", "ci-pr-7", changes[:3])
    assert len(small.to_markdown(limit=1000)) <= 1000 and "left out" in small.to_markdown(limit=1000)
