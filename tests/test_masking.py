"""Masking on pagila with generated rows: nothing original readable, joins and constraints hold.

Real Postgres throughout: the schema is restored into a database of the production
branch, rows come from generate_series, and every masked branch is a real branch.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import InvalidInput, TierbaseError
from tierbase.governance.masking import (
    MaskRule,
    apply_masking,
    check_rules,
    describe,
    load_table,
    masking_key,
    parse_rules,
    update_statement,
)
from tierbase.governance.masking_sql import _pads

from .conftest import drop_database
from .conftest import query as raw_query

PAGILA = Path(__file__).resolve().parent / "fixtures" / "pagila" / "pagila-schema.sql"
CUSTOMERS = 2000
PAYMENTS = 4000
KEY = b"project-secret-one"
OTHER_KEY = b"project-secret-two"
RULES = {
    "customer.email": "email",
    "customer.first_name": "hash",
    "customer.last_name": "hash",
    "public.address.phone": "partial",
    "payment.amount": "noise",
    # a text natural key and its reference: both sides masked alike keep the join
    "newsletter.email": "email",
    "subscription.email": "email",
    "probe.ref": "email",
}

# generated rows: realistic, unique e-mails; names repeat as real names do
SEED = f"""
ALTER TABLE payment ADD CONSTRAINT payment_amount_check CHECK (amount >= 0);
INSERT INTO country (country_id, country) SELECT g, 'Country ' || g FROM generate_series(1, 10) g;
INSERT INTO city (city_id, city, country_id) SELECT g, 'City ' || g, 1 + g % 10 FROM generate_series(1, 50) g;
INSERT INTO address (address_id, address, district, city_id, postal_code, phone)
  SELECT g, g || ' Main Street', 'District ' || g % 40, 1 + g % 50, lpad((g * 7)::text, 5, '0'),
         format('+1 (%s) %s-%s', 200 + g % 700, lpad((g % 1000)::text, 3, '0'), lpad((g * 37 % 10000)::text, 4, '0'))
  FROM generate_series(1, {CUSTOMERS} + 4) g;
INSERT INTO store (store_id, manager_staff_id, address_id) VALUES (1, 1, {CUSTOMERS} + 1), (2, 2, {CUSTOMERS} + 2);
INSERT INTO staff (staff_id, first_name, last_name, address_id, email, store_id, username)
  VALUES (1, 'Mike', 'Hillyer', {CUSTOMERS} + 3, 'mike@sakila.example', 1, 'mike'),
         (2, 'Jon', 'Stephens', {CUSTOMERS} + 4, 'jon@sakila.example', 2, 'jon');
INSERT INTO customer (customer_id, store_id, first_name, last_name, email, address_id, active)
  SELECT g, 1 + g % 2, f, l, lower(f || '.' || l || '.' || g || '@mail.example.com'), g, 1
  FROM generate_series(1, {CUSTOMERS}) g,
  LATERAL (SELECT (ARRAY['Mary','Patricia','Linda','Barbara','Elizabeth','Jennifer','Maria','Susan',
                         'James','John','Robert','Michael','William','David','Richard','Joseph'])[1 + g % 16] AS f,
                  (ARRAY['Smith','Johnson','Williams','Brown','Jones','Garcia','Miller','Davis','Rodriguez',
                         'Martinez','Hernandez','Lopez','Gonzalez','Wilson','Anderson','Thomas','Taylor',
                         'Moore','Jackson','Martin','Lee','Perez','Thompson','White'])[1 + (g / 16) % 24] AS l) n;
INSERT INTO language (language_id, name) VALUES (1, 'English');
INSERT INTO film (film_id, title, language_id, fulltext, length)
  SELECT g, 'Film ' || g, 1, to_tsvector('Film ' || g), 45 + g * 9 FROM generate_series(1, 10) g;
INSERT INTO inventory (inventory_id, film_id, store_id) SELECT g, 1 + g % 10, 1 + g % 2 FROM generate_series(1, 20) g;
INSERT INTO rental (rental_id, rental_date, inventory_id, customer_id, staff_id)
  SELECT g, timestamptz '2022-01-01 00:00+00' + g * interval '1 hour', 1 + g % 20, 1 + g % {CUSTOMERS}, 1 + g % 2
  FROM generate_series(1, {PAYMENTS}) g;
INSERT INTO payment (payment_id, customer_id, staff_id, rental_id, amount, payment_date)
  SELECT g, 1 + g % {CUSTOMERS}, 1 + g % 2, g, round((0.99 + (g % 12))::numeric, 2),
         timestamptz '2022-01-02 00:00+00' + (g % 150) * interval '1 day' + g * interval '1 second'
  FROM generate_series(1, {PAYMENTS}) g;
CREATE TABLE newsletter (email text PRIMARY KEY, since date NOT NULL DEFAULT current_date);
CREATE TABLE subscription (id int PRIMARY KEY, email text NOT NULL REFERENCES newsletter (email) ON UPDATE CASCADE,
                           plan text NOT NULL);
INSERT INTO newsletter (email) SELECT email FROM customer WHERE customer_id % 3 = 0;
INSERT INTO subscription SELECT customer_id, email, 'plan ' || customer_id % 4 FROM customer WHERE customer_id % 3 = 0;
CREATE MATERIALIZED VIEW customer_emails AS SELECT customer_id, email FROM customer;
CREATE TABLE probe (id int PRIMARY KEY, code varchar(6) UNIQUE, short_name varchar(5), note text, label varchar(12),
                    tag text DEFAULT 'tag' CHECK (tag ~ '^[a-z]+$'),
                    ref text REFERENCES newsletter (email), doubled int GENERATED ALWAYS AS (id * 2) STORED);
INSERT INTO probe (id, code, ref) SELECT customer_id, 'c' || customer_id, email FROM customer
  WHERE customer_id % 3 = 0 AND customer_id <= 30;
UPDATE probe SET short_name = (ARRAY['Zoë', '', 'ab-1', 'X', NULL, 'Ab 9z', 'ÅÄÖ', 'q.r', '12', 'Mm'])[id / 3],
                 note = (ARRAY[repeat('Call 555-0100 ext. 12, ask for Ann. ', 3), '', NULL, 'Ünïcödé → 東京 #42',
                               repeat('x', 64), repeat('y', 65), 'Short', '(none)', 'a-b-c-d-e-f', 'Z'])[id / 3],
                 label = 'label-' || id;
UPDATE staff SET password = 'secret-' || staff_id;
ANALYZE;
"""


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    return cast(list[tuple[Any, ...]], raw_query(url, sql))


@dataclass
class Pagila:
    db: str
    prod: str  # superuser URL of the database on production

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return query(self.prod, sql)


@pytest.fixture(scope="module")
def pagila(platform: Tierbase) -> Iterator[Pagila]:
    if not PAGILA.exists():
        pytest.skip(f"the pagila fixture is not at {PAGILA}")
    db = f"mask_{secrets.token_hex(3)}"
    platform.import_dump(str(PAGILA), "production", db)
    prod = platform.branch_url("production", db, direct=True)
    try:
        with psycopg.connect(prod, autocommit=True) as conn:
            conn.execute("SET search_path = public")
            conn.execute(SEED)
        yield Pagila(db, prod)
    finally:
        drop_database(platform.branch_url("production", direct=True), db)


@pytest.fixture
def new_branch(platform: Tierbase) -> Iterator[Any]:
    """A factory of started branches of production (or of another branch), all deleted afterwards."""
    made: list[str] = []

    def make(parent: str = "production") -> str:
        name = f"m-{secrets.token_hex(3)}"
        platform.create_branch(name, parent)
        made.append(name)
        platform.start_branch(name)
        return name

    yield make
    for name in reversed(made):
        if platform.store.find(name):
            platform.delete_branch(name, recursive=True)


def mask(platform: Tierbase, branch: str, db: str, key: bytes = KEY) -> dict[str, Any]:
    with psycopg.connect(admin_url(platform, branch, db)) as conn:
        return apply_masking(conn, parse_rules(RULES), key)


def admin_url(platform: Tierbase, branch: str, db: str) -> str:
    """The platform's own superuser on a branch (unix socket, peer auth): masking is the platform's job."""
    platform.branches.start(branch)
    return platform.branches.provider.endpoint(platform.store.get(branch).port, db).dsn()


def column(url: str, sql: str) -> set[Any]:
    return {r[0] for r in query(url, sql)}


CUSTOMER_COLUMNS = "SELECT customer_id, email, first_name, last_name, last_update FROM customer ORDER BY 1"


def test_masked_branch_shows_no_original_value_and_keeps_joins(platform: Tierbase, pagila: Pagila,
                                                                new_branch: Any) -> None:
    before = pagila.rows(CUSTOMER_COLUMNS)
    name = new_branch()
    got = mask(platform, name, pagila.db)
    url = platform.branch_url(name, pagila.db, direct=True)

    assert got["rules"] == describe(parse_rules(RULES))
    assert got["tables"] == {"customer": CUSTOMERS, "public.address": CUSTOMERS + 4, "payment": PAYMENTS,
                             "newsletter": CUSTOMERS // 3, "subscription": CUSTOMERS // 3, "probe": 10}
    assert got["refreshed"] == ["public.customer_emails"]
    assert "foreign key subscription_email_fkey" in got["checked"]
    for col, table in (("email", "customer"), ("first_name", "customer"), ("last_name", "customer"),
                       ("phone", "address"), ("email", "newsletter"), ("email", "subscription"),
                       ("email", "customer_emails")):
        sql = f"SELECT {col} FROM {table}"
        original, masked = column(pagila.prod, sql), column(url, sql)
        assert original and masked, (table, col)
        assert not original & masked, f"original {table}.{col} values are readable on the masked branch"

    after = query(url, CUSTOMER_COLUMNS)
    assert [r[0] for r in after] == [r[0] for r in before]
    assert [r[4] for r in after] == [r[4] for r in before], "the last_updated trigger fired"
    # a valid address stays valid, as long as the original (at least 30 characters)
    assert all(re.fullmatch(r"u[0-9a-f]{13,64}@example\.invalid", r[1]) and len(r[1]) == max(30, len(b[1]))
               for r, b in zip(after, before, strict=True))
    assert all(re.fullmatch(r"[0-9a-f]{64}", r[2]) and re.fullmatch(r"[0-9a-f]{64}", r[3]) for r in after)
    assert len({r[1] for r in after}) == CUSTOMERS  # unique stays unique
    # the same name masks to the same hash: as many distinct masked names as real ones
    assert len({r[3] for r in after}) == len({r[3] for r in before})
    # the construction is HMAC-SHA256 under a key derived from the project's secret
    mac = hmac.new(masking_key(KEY), b"email:" + before[0][1].encode(), hashlib.sha256).hexdigest()
    assert after[0][1] == f"u{mac[:max(13, len(before[0][1]) - 17)]}@example.invalid"

    # joins and views still see every row
    for sql in ("SELECT count(*) FROM customer c JOIN address a USING (address_id)",
                "SELECT count(*) FROM customer c JOIN payment p USING (customer_id)",
                "SELECT count(*) FROM subscription s JOIN newsletter n USING (email)",
                "SELECT count(*) FROM subscription s JOIN customer c USING (email)",
                "SELECT count(*) FROM probe p JOIN newsletter n ON n.email = p.ref",
                "SELECT count(*) FROM customer_list"):
        assert query(url, sql) == query(pagila.prod, sql), sql

    assert_constraints_hold(url)
    assert_stats_clean(pagila, url)
    assert pagila.rows(CUSTOMER_COLUMNS) == before, "production changed"


def test_partial_keeps_the_shape_and_noise_stays_close(platform: Tierbase, pagila: Pagila, new_branch: Any) -> None:
    name = new_branch()
    mask(platform, name, pagila.db)
    url = platform.branch_url(name, pagila.db, direct=True)
    sql = "SELECT address_id, phone FROM address ORDER BY 1"
    for (_, old), (_, new) in zip(query(pagila.prod, sql), query(url, sql), strict=True):
        assert len(new) == len(old) and new[-2:] == old[-2:]
        assert re.sub(r"\d", "9", old) == re.sub(r"\d", "9", new), (old, new)  # separators where they were
        assert new != old
    sql = "SELECT payment_id, payment_date, amount FROM payment ORDER BY 1, 2"
    pairs = list(zip(query(pagila.prod, sql), query(url, sql), strict=True))
    assert all(a[:2] == b[:2] for a, b in pairs)
    changed = 0
    for (_, _, old), (_, _, new) in pairs:
        assert isinstance(new, Decimal) and new == round(new, 2) and new >= 0
        assert old * Decimal("0.9") - Decimal("0.005") <= new <= old * Decimal("1.1") + Decimal("0.005")
        changed += new != old
    assert changed > len(pairs) * 0.8
    # the sum moves a little, but not far
    total = "SELECT sum(amount) FROM payment"
    assert abs(query(url, total)[0][0] / query(pagila.prod, total)[0][0] - 1) < Decimal("0.02")

    # short values take an unrolled expression, long ones a per-character subquery: both give the same
    other = new_branch()
    other_url = admin_url(platform, other, pagila.db)
    with psycopg.connect(other_url) as conn:
        conn.execute("SET session_replication_role = replica")
        rule = MaskRule("address", "phone", "partial")
        table = load_table(conn, "public", "address")
        assert table is not None
        conn.execute(update_statement(table, [rule]), _pads(KEY))  # no widths: the per-character subquery
        conn.commit()
    sql = "SELECT address_id, phone FROM address ORDER BY 1"
    assert query(other_url, sql) == query(url, sql)


def test_masking_is_deterministic_per_key_and_inherited_by_children(platform: Tierbase, pagila: Pagila,
                                                                     new_branch: Any) -> None:
    prod_before = pagila.rows(CUSTOMER_COLUMNS)
    one, two, other = new_branch(), new_branch(), new_branch()
    for name, key in ((one, KEY), (two, KEY), (other, OTHER_KEY)):
        mask(platform, name, pagila.db, key)
    urls = {n: platform.branch_url(n, pagila.db, direct=True) for n in (one, two, other)}
    for sql in (CUSTOMER_COLUMNS, "SELECT address_id, phone FROM address ORDER BY 1",
                "SELECT payment_id, payment_date, amount FROM payment ORDER BY 1, 2"):
        assert query(urls[one], sql) == query(urls[two], sql), sql
    emails = "SELECT email FROM customer"
    assert not column(urls[one], emails) & column(urls[other], emails), "another key must give other masks"

    # a branch of a masked branch (two levels down) holds the masked data, never the original
    child = new_branch(one)
    grandchild = new_branch(child)
    url = platform.branch_url(grandchild, pagila.db, direct=True)
    assert query(url, CUSTOMER_COLUMNS) == query(urls[one], CUSTOMER_COLUMNS)
    assert not column(url, emails) & column(pagila.prod, emails)

    assert pagila.rows(CUSTOMER_COLUMNS) == prod_before, "production changed"


def test_apply_refuses_bad_rules_and_changes_nothing(platform: Tierbase, pagila: Pagila, new_branch: Any) -> None:
    name = new_branch()
    url = admin_url(platform, name, pagila.db)
    bad = [MaskRule("customer", "email", "email"), MaskRule("customer", "first_name", "null")]
    with psycopg.connect(url) as conn, pytest.raises(InvalidInput, match=r"masking\.customer\.first_name: null"):
        apply_masking(conn, bad, KEY)
    assert query(url, CUSTOMER_COLUMNS) == pagila.rows(CUSTOMER_COLUMNS)
    with psycopg.connect(url) as conn, pytest.raises(InvalidInput, match="key is empty"):
        apply_masking(conn, bad[:1], b"")
    # a rule that passes the checks but trips over a CHECK constraint: all rolled back
    tripping = [MaskRule("customer", "email", "email"), MaskRule("probe", "tag", "redact")]
    with psycopg.connect(url) as conn:
        assert check_rules(conn, tripping) == []
        with pytest.raises(TierbaseError, match=r"rolled back: .*violates check constraint \"probe_tag_check\""):
            apply_masking(conn, tripping, KEY)
    assert query(url, CUSTOMER_COLUMNS) == pagila.rows(CUSTOMER_COLUMNS)


OTHER_RULES = {
    "staff.email": "redact", "staff.password": "null", "staff.username": "hash", "probe.label": "hash",
    "probe.note": "partial", "probe.short_name": "partial", "film.rental_rate": "noise", "film.length": "noise",
}


def test_the_other_methods(platform: Tierbase, pagila: Pagila, new_branch: Any) -> None:
    name = new_branch()
    url = admin_url(platform, name, pagila.db)
    with psycopg.connect(url) as conn:
        got = apply_masking(conn, parse_rules(OTHER_RULES), KEY)
    assert got["tables"] == {"staff": 2, "probe": 10, "film": 10}
    staff = "SELECT staff_id, email, password, username FROM staff ORDER BY 1"
    for (_, email, password, username), (_, old_email, _, old_username) in zip(query(url, staff),
                                                                                pagila.rows(staff), strict=True):
        assert (email, password) == ("REDACTED", None) and old_email != email
        assert re.fullmatch(r"[0-9a-f]{64}", username)
        assert username == hmac.new(masking_key(KEY), b"hash:" + old_username.encode(), hashlib.sha256).hexdigest()
    sql = "SELECT id, short_name, note, label FROM probe ORDER BY 1"
    for (_, short, note, label), (_, old_short, old_note, old_label) in zip(query(url, sql), pagila.rows(sql),
                                                                          strict=True):
        assert re.fullmatch(r"[0-9a-f]{12}", label) and label != old_label  # fitted to varchar(12)
        for new, old in ((short, old_short), (note, old_note)):
            if old is None or old == "":
                assert new == old
                continue
            assert len(new) == len(old), (old, new)
            tail = 2 if len(old) >= 6 else 0
            assert new[len(new) - tail:] == old[len(old) - tail:]
            for a, b in zip(old[:len(old) - tail], new[:len(new) - tail], strict=True):
                if a.isascii() and not a.isalnum():
                    assert b == a, (old, new)  # punctuation and spaces stay
                elif a.isdigit():
                    assert b.isdigit()
                else:
                    assert b.isascii() and b.isalpha() and (b.isupper() == (a.isascii() and a.isupper()))
            if len(old) > 3:
                assert new != old
    film = "SELECT film_id, rental_rate, length, fulltext::text, last_update FROM film ORDER BY 1"
    for (_, rate, length, fulltext, updated), (_, old_rate, old_length, old_fulltext, old_updated) in zip(
            query(url, film), pagila.rows(film), strict=True):
        assert (fulltext, updated) == (old_fulltext, old_updated), "a trigger fired"
        assert old_rate * Decimal("0.9") - Decimal("0.005") <= rate <= old_rate * Decimal("1.1") + Decimal("0.005")
        assert isinstance(length, int) and old_length * 0.9 - 0.5 <= length <= old_length * 1.1 + 0.5
    assert_constraints_hold(url)


def test_check_rules_names_each_bad_rule(pagila: Pagila) -> None:
    cases = {
        "nosuch.email": "there is no table public.nosuch in database x",
        "customer.emial": "table public.customer has no column 'emial'",
        "customer.first_name=null": "null on a NOT NULL column",
        "customer.email=noise": "noise needs a numeric column, email is text",
        "customer.active=email": "email needs a text column, active is integer",
        "customer.customer_id=noise": "part of the primary key and noise would make duplicates",
        "probe.code=partial": "part of a unique key and partial would make duplicates",
        "probe.code=email": "email writes at least 30 characters, code is character varying(6)",
        "probe.short_name=hash": "hash needs at least 8 characters",
        "probe.doubled=noise": "doubled is a generated column",
        "customer_list.name=redact": "public.customer_list is a view",
        "payment_p2022_01.amount=noise": "is a partition of public.payment",
        "payment.payment_date=null": "null on a NOT NULL column",
        "newsletter.email=email": "foreign key subscription_email_fkey links it to public.subscription.email",
        "subscription.email=hash": "foreign key subscription_email_fkey links it to public.newsletter.email",
    }
    with psycopg.connect(pagila.prod) as conn:
        for spec, expected in cases.items():
            target, _, method = spec.partition("=")
            table, col = target.rsplit(".", 1)
            rule = MaskRule(table, col, method or "email")
            problems = check_rules(conn, [rule], database="x")
            assert problems and all(p.startswith(f"masking.{target}: ") for p in problems), (spec, problems)
            assert any(expected in p for p in problems), (spec, problems)
        assert check_rules(conn, parse_rules(RULES)) == []
        # both sides of the key with the same method is fine; different methods are not
        mixed = [MaskRule("newsletter", "email", "hash"), MaskRule("subscription", "email", "email"),
                 MaskRule("probe", "ref", "hash")]
        assert [p.split(":")[0] for p in check_rules(conn, mixed)] == ["masking.subscription.email"]
        # a NULL reference satisfies a foreign key; a redacted one does not
        assert check_rules(conn, [MaskRule("probe", "ref", "null")]) == []
        assert "foreign key probe_ref_fkey" in check_rules(conn, [MaskRule("probe", "ref", "redact")])[0]


def test_parse_rules() -> None:
    rules = parse_rules({"customer.email": "email", "public.address.phone": "partial", "payment": {"amount": "noise"}})
    assert rules == [MaskRule("customer", "email", "email"), MaskRule("public.address", "phone", "partial"),
                     MaskRule("payment", "amount", "noise")]
    assert describe(rules) == ["customer.email=email", "public.address.phone=partial", "payment.amount=noise"]
    assert rules[1].qualified == ("public", "address") and rules[0].qualified == ("public", "customer")
    assert parse_rules({}) == []
    for mapping, expected in (
        ({"customer.email": "emial"}, "masking.customer.email: unknown method 'emial'"),
        ({"customer.email": 3}, "masking.customer.email: unknown method 3"),
        ({"email": "email"}, "masking.email: a rule's key is table.column"),
        ({"a.b.c.d": "hash"}, "masking.a.b.c.d: a rule's key"),
        ({"customer..email": "hash"}, "masking.customer..email: a rule's key"),
        ({"customer.email": "email", "public.customer.email": "hash"},
         "masking.public.customer.email: the same column as masking.customer.email"),
    ):
        with pytest.raises(InvalidInput) as err:
            parse_rules(mapping)
        assert expected in err.value.message, err.value.message
        assert err.value.hint
    with pytest.raises(InvalidInput) as err:
        parse_rules({"x": "email", "customer.phone": "blur"})
    assert len(err.value.data["problems"]) == 2


# -- constraint checks, written independently of the module under test ---------------------------------------
def assert_constraints_hold(url: str) -> None:
    """Re-create every foreign key and check constraint (which validates every row), in a rolled-back transaction;
    look for duplicates under every primary and unique key."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.contype FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = 'public' AND c.conparentid = 0 "
            "AND c.conrelid <> 0 AND c.contype IN ('f', 'c', 'p', 'u') AND (c.contype <> 'c' OR c.coninhcount = 0) "
            "ORDER BY 1, 2").fetchall()
        kinds = {r[3] for r in rows}
        assert kinds == {"f", "c", "p", "u"}, kinds
        for table, name, definition, kind in rows:
            if kind in ("f", "c"):
                conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
                conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')  # validates every row
            else:
                cols = definition[definition.index("(") + 1:definition.rindex(")")]
                dup = conn.execute(f"SELECT {cols} FROM {table} GROUP BY {cols} HAVING count(*) > 1 LIMIT 1")
                assert dup.fetchone() is None, (table, name)
        conn.rollback()


def assert_stats_clean(pagila: Pagila, url: str) -> None:
    """pg_stats (most common values, histograms) must not keep the values masking replaced."""
    sql = ("SELECT coalesce(most_common_vals::text, '') || coalesce(histogram_bounds::text, '') FROM pg_stats "
           "WHERE schemaname = 'public' AND tablename = 'customer' AND attname IN ('email', 'last_name')")
    prod_stats = " ".join(r[0] for r in query(pagila.prod, sql))
    assert "Smith" in prod_stats or "@mail.example.com" in prod_stats  # production has stats to leak
    branch_stats = " ".join(r[0] for r in query(url, sql))
    assert branch_stats
    for name in column(pagila.prod, "SELECT last_name FROM customer"):
        assert name not in branch_stats
    assert "@mail.example.com" not in branch_stats
