"""Reading migrations for what they do to masked data (pglast only, no database)."""

from __future__ import annotations

from tierbase.migrate.sensitivity import analyze

EMAIL = ("public", "customer", "email")
SENSITIVE = [("public", "customer")]


def report(sql: str, classified: tuple[tuple[str, str, str], ...] = ()) -> dict[str, object]:
    return analyze([("V0001__x.sql", sql)], {EMAIL: "email"}, classified, SENSITIVE).to_dict()


def derived(sql: str) -> dict[str, tuple[str, str]]:
    got = report(sql)["derived"]
    assert isinstance(got, list)
    return {d["column"]: (d["from"], d["how"]) for d in got}


def test_copies_of_a_masked_column_inherit_its_rule_through_every_path() -> None:
    assert derived("UPDATE customer SET email_local = split_part(email, '@', 1)") == {
        "public.customer.email_local": ("public.customer.email", "UPDATE ... SET")}
    assert derived("UPDATE public.customer c SET x = lower(c.email), y = 1") == {
        "public.customer.x": ("public.customer.email", "UPDATE ... SET")}
    assert derived("UPDATE other o SET addr = c.email FROM customer c WHERE c.customer_id = o.id") == {
        "public.other.addr": ("public.customer.email", "UPDATE ... SET")}
    assert derived("INSERT INTO audit.rejects (addr, n) SELECT upper(email), 1 FROM customer") == {
        "audit.rejects.addr": ("public.customer.email", "INSERT ... SELECT")}
    assert derived("INSERT INTO rejects SELECT customer_id, email FROM customer") == {
        "public.rejects.#2": ("public.customer.email", "INSERT ... SELECT")}  # no column list: by position
    assert derived("CREATE TABLE m (id, mail) AS SELECT customer_id, email FROM customer") == {
        "public.m.mail": ("public.customer.email", "CREATE TABLE AS")}
    # a chain: a copy of a copy, in file order
    assert derived("UPDATE customer SET a = email; CREATE TABLE t AS SELECT a AS b FROM customer") == {
        "public.customer.a": ("public.customer.email", "UPDATE ... SET"),
        "public.t.b": ("public.customer.a", "CREATE TABLE AS")}
    # views and materialized views read (or are refreshed from) the masked tables: nothing to inherit
    assert derived("CREATE VIEW v AS SELECT email FROM customer; "
                   "CREATE MATERIALIZED VIEW mv AS SELECT email FROM customer") == {}
    # a filter on a masked column copies nothing
    assert derived("INSERT INTO r (id) SELECT customer_id FROM customer WHERE email LIKE '%x%'") == {}


def test_trigger_functions_in_either_order() -> None:
    fn = ("CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.low := lower(NEW.email); "
          "RETURN NEW; END $$;")
    trig = "CREATE TRIGGER t BEFORE INSERT ON customer FOR EACH ROW EXECUTE FUNCTION f();"
    for sql in (fn + trig, trig + fn):
        assert derived(sql) == {"public.customer.low": ("public.customer.email", "trigger function f()")}


def test_added_columns_of_sensitive_tables_need_a_classification() -> None:
    got = report("ALTER TABLE customer ADD COLUMN nick text, ADD COLUMN age int;\n"
                 "ALTER TABLE store ADD COLUMN note text;\nCREATE TABLE public.customer_x (id int);",
                 classified=(("public", "customer", "age"),))
    assert got["unclassified"] == [{"column": "public.customer.nick", "where": "V0001__x.sql:1"}]
    # derived counts as classified (it inherits), so does a rule in the same change
    assert report("ALTER TABLE customer ADD COLUMN l text; UPDATE customer SET l = email;")["unclassified"] == []


def test_renames_and_drops_move_the_rules() -> None:
    got = report("ALTER TABLE customer RENAME COLUMN email TO mail;\nUPDATE customer SET m2 = mail;\n"
                 "ALTER TABLE customer DROP COLUMN mail;")
    assert got["renamed"] == [{"from": "public.customer.email", "to": "public.customer.mail", "method": "email",
                               "where": "V0001__x.sql:1"}]
    assert [d["column"] for d in got["derived"]] == ["public.customer.m2"]  # follows the new name
    assert got["dropped"] == [{"column": "public.customer.mail", "method": "email", "where": "V0001__x.sql:3"}]
    assert report("SELECT 1; this is not sql")["derived"] == []  # syntax errors are verify's to report


def test_copies_through_subqueries_ctes_and_star_inherit_too() -> None:
    """A backfill written with a CTE or a subquery in FROM copies as much as a plain one."""
    local = "public.customer.email_local"
    assert derived("WITH p AS (SELECT customer_id AS id, split_part(email, '@', 1) AS l FROM customer) "
                   "UPDATE customer c SET email_local = p.l FROM p WHERE p.id = c.customer_id") == {
        local: ("public.customer.email", "UPDATE ... SET")}
    assert derived("UPDATE customer c SET email_local = s.l FROM (SELECT customer_id, split_part(email, '@', 1) "
                   "FROM customer) AS s (id, l) WHERE s.id = c.customer_id") == {
        local: ("public.customer.email", "UPDATE ... SET")}
    # into another table, through a chain of CTEs, a UNION, a subquery's *
    assert derived("WITH a AS (SELECT email AS e FROM customer), b (x) AS (SELECT lower(e) FROM a) "
                   "INSERT INTO rejects (raw) SELECT x FROM b") == {
        "public.rejects.raw": ("public.customer.email", "INSERT ... SELECT")}
    assert derived("INSERT INTO rejects (raw) SELECT v FROM (SELECT 'none' AS v UNION ALL SELECT email "
                   "FROM customer) u") == {"public.rejects.raw": ("public.customer.email", "INSERT ... SELECT")}
    assert derived("INSERT INTO rejects (raw) SELECT s.email FROM (SELECT * FROM customer) s") == {
        "public.rejects.raw": ("public.customer.email", "INSERT ... SELECT")}
    assert derived("CREATE TABLE backup AS SELECT c.* FROM customer c") == {
        "public.backup.email": ("public.customer.email", "CREATE TABLE AS")}
    # reading other columns through them copies nothing
    assert derived("WITH s AS (SELECT customer_id FROM customer WHERE email LIKE '%x') "
                   "INSERT INTO r (id) SELECT customer_id FROM s") == {}
    assert derived("UPDATE other o SET n = s.id FROM (SELECT customer_id AS id, email FROM customer) s "
                   "WHERE s.id = o.id") == {}
    # a column added and filled through a CTE is classified by what it copies
    assert report("ALTER TABLE customer ADD COLUMN l text; WITH p AS (SELECT customer_id AS id, email AS e "
                  "FROM customer) UPDATE customer SET l = p.e FROM p WHERE p.id = customer.customer_id"
                  )["unclassified"] == []
