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
