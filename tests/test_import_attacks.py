"""Import is data, not a path: dumps and migrations go over the real API as content.

One service (`tierbase up`) for the module; a platform engineer (the data dir's owner) and an
agent principal act through the CLI, the SDK and raw HTTP. Every refusal is checked for its
message and exit code, for leaving the branch as it was, and for the side effect not happening.
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tierbase.api.client import Client
from tierbase.compute import find_binaries
from tierbase.errors import InvalidInput, PolicyDenied, TierbaseError, UnsafeDump, UploadTooLarge
from tierbase.migrate.files import MigrationError, discover, from_contents, read_dir

from .conftest import free_port, make_home, needs_root_btrfs, query
from .test_cli import leftovers, new_env, tierbase

pytestmark = needs_root_btrfs

LIMIT = 4 * 1024**2  # the service's import limit in this module


@dataclass
class Svc:
    env: dict[str, str]  # the platform engineer's CLI environment
    agent_env: dict[str, str]
    home: Path
    url: str
    pe: Client
    agent: Client
    agent_token: str
    agent_branch: str
    source_url: str  # a database with data to dump, on production

    def direct(self, branch: str, db: str = "postgres") -> str:
        return self.pe.branch_url(branch, db, direct=True)

    def http(self, token: str | None = None) -> httpx.Client:
        tok = token or (self.home / "api.token").read_text().strip()
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {tok}"}, timeout=120)


@pytest.fixture(scope="module")
def svc() -> Iterator[Svc]:
    home = make_home() / "home"
    env = new_env(home)
    try:
        up = json.loads(tierbase(env, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port",
                                 str(free_port()), "--import-limit", "4M", "--json").stdout)
        # act as the owner by token, as a script would (without one, every command says so on stderr)
        env["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        pe = Client(home)
        made = pe.create_principal("bot", "agent")
        agent = Client(home, url=up["api_url"], token=made["token"])
        # agents may not branch off the protected root, nor off anything holding its data (lineage): an
        # unprotected entry tier under it is where they work
        pe.apply_config('[tiers.production]\nprotected = true\n\n[tiers.scratch]\nparent = "production"\n'
                        'entry = true\n', "test")
        agent_branch = agent.create_branch("bot-work", "scratch")["name"]
        src = pe.branch_url("production", direct=True)
        query(src, "CREATE DATABASE source")
        src = pe.branch_url("production", "source", direct=True)
        query(src, "CREATE TABLE items (id int PRIMARY KEY, note text)")
        # data a naive scanner would take for meta-commands: backslashes in COPY data and in a function body
        query(src, "INSERT INTO items SELECT g, E'back\\\\slash \\\\! id ' || g FROM generate_series(1, 50) g")
        query(src, "CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql AS $f$ SELECT t || E'\\\\! !' $f$")
        yield Svc(env, dict(env, TIERBASE_TOKEN=made["token"]), home, up["api_url"], pe, agent, made["token"],
                  agent_branch, src)
    finally:
        tierbase(env, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def pg_dump(url: str, out: Path, fmt: str) -> Path:
    subprocess.run([find_binaries()["pg_dump"], f"-F{fmt}", "-f", str(out), "-d", url], check=True,
                   capture_output=True)
    return out


def db_exists(svc: Svc, branch: str, db: str) -> bool:
    return query(svc.direct(branch), "SELECT count(*) FROM pg_database WHERE datname=%s", db) == [(1,)]


def uploads_left(svc: Svc) -> list[str]:
    d = svc.home / "uploads"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# -- happy paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["p", "c", "t", "d"])
def test_each_dump_format_restores_through_the_cli(svc: Svc, tmp_path: Path, fmt: str) -> None:
    dump = pg_dump(svc.source_url, tmp_path / f"dump.{fmt}", fmt)
    db = f"imp_{fmt}_{secrets.token_hex(2)}"
    got = json.loads(tierbase(svc.env, "import", str(dump), "--branch", "production", "--database", db,
                              "--json").stdout)
    assert got["database"] == db and got["format"] == {"c": "custom", "t": "tar"}.get(fmt, "plain")
    url = svc.direct("production", db)
    assert query(url, "SELECT count(*), min(note) FROM items") == query(svc.source_url,
                                                                         "SELECT count(*), min(note) FROM items")
    assert query(url, "SELECT shout('x')") == [("x\\! !",)]
    assert uploads_left(svc) == []


def test_an_agent_imports_into_its_own_branch_with_the_sdk(svc: Svc, tmp_path: Path) -> None:
    dump = pg_dump(svc.source_url, tmp_path / "dump.sql", "p")
    got = svc.agent.import_dump(dump, svc.agent_branch, "mine")
    assert got["branch"] == svc.agent_branch and got["bytes"] == dump.stat().st_size
    assert query(svc.direct(svc.agent_branch, "mine"), "SELECT count(*) FROM items") == [(50,)]
    # not into production: refused by policy before a byte is read (exit 2), nothing made
    denied = tierbase(svc.agent_env, "import", str(dump), "--database", "agent_prod", check=False)
    assert denied.returncode == 2 and "refused" in denied.stderr
    assert not db_exists(svc, "production", "agent_prod")
    audit = svc.pe.audit_log(actor="bot", action="branch.import", denied=True)
    assert audit and audit[-1]["target"] == "production"


# -- meta-commands ----------------------------------------------------------------------------
ATTACKS = {
    "shell": ("\\! touch {marker}", "\\!"),
    "pipe": ("\\o |touch {marker}", "\\o"),
    "copy-program": ("\\copy seedless from program 'touch {marker}'", "\\copy"),
    "include": ("\\i /etc/passwd", "\\i"),
    "include-relative": ("\\ir ../../etc/passwd", "\\ir"),
    "set": ("\\set x `touch {marker}`", "\\set"),
    "connect": ("\\connect postgres", "\\connect"),
    "gexec": ("SELECT 'SELECT 1' \\gexec", "\\gexec"),
    "mid-line": ("SELECT 1; \\! touch {marker}", "\\!"),
    "after-copy": ("COPY t (x) FROM stdin;\n1\n\\.\n\\! touch {marker}", "\\!"),
}


@pytest.mark.parametrize("who", ["engineer", "agent"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_meta_commands_are_refused_and_nothing_runs(svc: Svc, tmp_path: Path, who: str, attack: str) -> None:
    marker = Path("/tmp") / f"tierbase-pwned-{secrets.token_hex(4)}"
    line, command = ATTACKS[attack]
    dump = tmp_path / "evil.sql"
    dump.write_text(f"CREATE TABLE t (x int);\n{line.format(marker=marker)}\nINSERT INTO t VALUES (2);\n")
    env, branch = (svc.env, "production") if who == "engineer" else (svc.agent_env, svc.agent_branch)
    db = f"evil_{secrets.token_hex(3)}"
    got = tierbase(env, "import", str(dump), "--branch", branch, "--database", db, check=False)
    assert got.returncode == 1, got.stderr
    assert got.stderr.startswith("Error: ") and f"meta-command `{command}`" in got.stderr
    assert "line 2" in got.stderr or "line 5" in got.stderr
    assert "passwd" not in got.stderr and "touch" not in got.stderr and "root:" not in got.stderr
    assert not marker.exists()
    assert not db_exists(svc, branch, db)
    as_js = json.loads(tierbase(env, "import", str(dump), "--branch", branch, "--database", db, "--json",
                                check=False).stdout)
    assert as_js["error"]["code"] == "unsafe_dump" and as_js["error"]["data"]["command"] == command
    assert uploads_left(svc) == []


def test_a_refused_dump_into_an_existing_database_changes_nothing(svc: Svc, tmp_path: Path) -> None:
    url = svc.direct(svc.agent_branch)
    query(url, "CREATE TABLE IF NOT EXISTS kept (x int)")
    query(url, "INSERT INTO kept VALUES (1)")
    before = query(url, "SELECT count(*) FROM kept")
    dump = tmp_path / "evil.sql"
    dump.write_text("INSERT INTO kept VALUES (2);\nDROP TABLE kept;\n\\! id\n")
    with pytest.raises(UnsafeDump, match="line 3"):
        svc.agent.import_dump(dump, svc.agent_branch)
    assert query(url, "SELECT count(*) FROM kept") == before
    # and a dump that fails in Postgres half-way is rolled back as a whole
    dump.write_text("INSERT INTO kept VALUES (2);\nSELECT 1/0;\n")
    with pytest.raises(TierbaseError, match="division by zero"):
        svc.agent.import_dump(dump, svc.agent_branch)
    assert query(url, "SELECT count(*) FROM kept") == before


# -- paths instead of content --------------------------------------------------------------------
@pytest.mark.parametrize("who", ["engineer", "agent"])
def test_a_path_sent_instead_of_content_is_refused_and_not_read(svc: Svc, who: str) -> None:
    secret = str(svc.home / "api.token")
    with svc.http(svc.agent_token if who == "agent" else None) as http:
        old_style = http.post("/v1/import", json={"path": secret, "branch": svc.agent_branch, "database": "x"})
        assert old_style.status_code == 400
        err = old_style.json()["error"]
        assert "application/octet-stream" in err["message"] and "opens no path" in err["message"]
        # the path itself as the body is just (bad) SQL: psql's ERROR line, no line of the file
        as_body = http.post("/v1/import", params={"branch": svc.agent_branch, "database": "asbody"},
                            content=secret.encode(), headers={"Content-Type": "application/octet-stream"})
        assert as_body.status_code == 422 and "syntax error" in as_body.json()["error"]["message"]
        token = (svc.home / "api.token").read_text().strip()
        assert token not in as_body.text and token not in old_style.text
    assert not db_exists(svc, svc.agent_branch, "asbody") and not db_exists(svc, svc.agent_branch, "x")
    got = tierbase(svc.env, "import", "/nonexistent/dump.sql", check=False)
    assert got.returncode == 1 and "does not exist" in got.stderr


def test_error_messages_keep_error_lines_but_not_context(svc: Svc, tmp_path: Path) -> None:
    dump = tmp_path / "bad.sql"
    dump.write_text("CREATE TABLE ctx (x int);\nCOPY ctx (x) FROM stdin;\nnot-a-number-SECRETDATA\n\\.\n")
    with pytest.raises(TierbaseError) as got:
        svc.pe.import_dump(dump, svc.agent_branch, "ctxdb")
    assert "invalid input syntax for type integer" in got.value.message
    assert "CONTEXT" not in got.value.message and "COPY ctx, line 1" not in got.value.message
    assert not db_exists(svc, svc.agent_branch, "ctxdb")


# -- size and archives ---------------------------------------------------------------------------
def test_an_oversized_body_is_refused_and_nothing_is_kept(svc: Svc, tmp_path: Path) -> None:
    big = tmp_path / "big.sql"
    big.write_bytes(b"SELECT 1;\n" * (LIMIT // 10 + 10))
    with pytest.raises(UploadTooLarge, match="import limit of 4 MiB"):
        svc.agent.import_dump(big, svc.agent_branch, "bigdb")
    got = tierbase(svc.env, "import", str(big), "--database", "bigdb", check=False)
    assert got.returncode == 1 and "larger than the import limit" in got.stderr

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts while it spools
        for _ in range(LIMIT // 65536 + 4):
            yield b"-- padding " + b"x" * 65525 + b"\n"

    with svc.http(svc.agent_token) as http:
        raw = http.post("/v1/import", params={"branch": svc.agent_branch, "database": "bigdb"}, content=chunks(),
                        headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 413 and raw.json()["error"]["code"] == "upload_too_large"
    assert not db_exists(svc, svc.agent_branch, "bigdb") and not db_exists(svc, "production", "bigdb")
    assert uploads_left(svc) == []
    assert (svc.home / "uploads").stat().st_mode & 0o777 == 0o700


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("case", "says"), [
    ("garbage-archive", "restoring the custom dump failed"),
    ("toc-only", "toc.dat of a tar or directory-format dump"),
    ("absolute", "a name with a directory part"),
    ("dotdot", "a name with a directory part"),
    ("symlink", "a link"),
    ("device", "a device"),
    ("not-pg-dump", "toc.dat is not its first member"),
    ("directory-in-tar", "holds a directory-format dump"),
    ("gzip", "compressed"),
    ("empty", "is empty"),
])
@pytest.mark.parametrize("who", ["engineer", "agent"])
def test_bad_archives_are_refused_clearly(svc: Svc, tmp_path: Path, case: str, says: str, who: str) -> None:
    toc = b"PGDMP\x01\x0e\x00\x04\x08\x03" + b"\x00" * 64
    f = tmp_path / "bad.dump"
    if case == "garbage-archive":
        f.write_bytes(b"PGDMP\x01\x0e\x00\x04\x08\x01" + random.Random(9).randbytes(4096))
    elif case == "toc-only":
        f.write_bytes(toc)
    elif case == "absolute":
        _tar(f, [(_member("toc.dat"), toc), (_member("/etc/cron.d/evil"), b"* * * * * root id\n")])
    elif case == "dotdot":
        _tar(f, [(_member("toc.dat"), toc), (_member("../../evil.dat"), b"x")])
    elif case == "symlink":
        _tar(f, [(_member("toc.dat"), toc), (_member("3000.dat", tarfile.SYMTYPE, "/home/x/api.token"), b"")])
    elif case == "device":
        _tar(f, [(_member("toc.dat"), toc), (_member("3000.dat", tarfile.CHRTYPE), b"")])
    elif case == "not-pg-dump":
        _tar(f, [(_member("hello.txt"), b"hi")])
    elif case == "directory-in-tar":
        d = pg_dump(svc.source_url, tmp_path / "dir", "d")
        with tarfile.open(f, "w") as tar:
            for p in sorted(d.iterdir(), key=lambda p: p.name != "toc.dat"):
                tar.add(p, arcname=p.name)
    elif case == "gzip":
        f.write_bytes(b"\x1f\x8b\x08" + os.urandom(100))
    else:
        f.write_bytes(b"")
    db = f"bad_{secrets.token_hex(3)}"
    env, branch = (svc.env, "production") if who == "engineer" else (svc.agent_env, svc.agent_branch)
    got = tierbase(env, "import", str(f), "--branch", branch, "--database", db, check=False)
    assert got.returncode == 1 and got.stderr.startswith("Error: ") and says in got.stderr, got.stderr
    assert "root id" not in got.stderr
    assert not db_exists(svc, branch, db)
    assert not Path("/etc/cron.d/evil").exists()
    assert uploads_left(svc) == []


def test_a_bad_database_name_is_refused_before_upload(svc: Svc, tmp_path: Path) -> None:
    dump = tmp_path / "ok.sql"
    dump.write_text("SELECT 1;\n")
    with pytest.raises(InvalidInput, match="not accepted for an import"):
        svc.pe.import_dump(dump, "production", "host=/tmp user=evil")
    with pytest.raises(PolicyDenied):
        svc.agent.import_dump(dump, "production", "postgres")


# -- migrations from content ------------------------------------------------------------------------
def _migrations(tmp_path: Path) -> Path:
    d = tmp_path / "migrations"
    d.mkdir()
    (d / "V0001__widgets.sql").write_text("CREATE TABLE widgets (id int PRIMARY KEY);\r\n")
    (d / "U0001__widgets.sql").write_text("DROP TABLE widgets;\n")
    (d / "README.md").write_text("not a migration\n")
    return d


@pytest.fixture
def fresh(svc: Svc) -> Iterator[str]:
    """A new branch of the agent's own."""
    name = svc.agent.create_branch(f"bot-{secrets.token_hex(3)}", "scratch")["name"]
    yield name
    svc.agent.delete_branch(name, recursive=True)


def test_migrations_verify_apply_status_over_http_from_content(svc: Svc, tmp_path: Path, fresh: str) -> None:
    d = _migrations(tmp_path)
    verified = json.loads(tierbase(svc.agent_env, "migrate", "verify", "--parent", fresh, "--dir", str(d),
                                   "--json").stdout)
    assert verified["ok"] is True, verified
    applied = json.loads(tierbase(svc.agent_env, "migrate", "apply", "--branch", fresh, "--dir", str(d),
                                  "--json").stdout)
    assert [a["version"] for a in applied["applied"]] == [1]
    assert query(svc.direct(fresh), "SELECT to_regclass('widgets')::text") == [("widgets",)]
    status = svc.agent.migrate_status(fresh, str(d))
    assert len(status["applied"]) == 1 and status["pending"] == [] and status.get("drift", []) == []
    # the server computes the checksum from what it is sent: a changed file is drift
    (d / "V0001__widgets.sql").write_text("CREATE TABLE widgets (id bigint PRIMARY KEY);\n")
    assert [x["label"] for x in svc.agent.migrate_status(fresh, str(d))["drift"]] == ["V0001__widgets"]


def test_migration_endpoints_take_no_directory(svc: Svc, tmp_path: Path, fresh: str) -> None:
    with svc.http(svc.agent_token) as http:
        # the contents are all there is: no such directory exists on the server
        got = http.post("/v1/migrations/apply", json={"branch": fresh, "files": {
            "V0001__from_content.sql": "CREATE TABLE from_content (x int);\n"}})
        assert got.status_code == 200, got.text
        assert query(svc.direct(fresh), "SELECT to_regclass('from_content')::text") == [("from_content",)]
        for route, extra in (("/v1/migrations/apply", {"branch": fresh}), ("/v1/migrations/verify", {"branch": fresh}),
                             ("/v1/migrations/status", {"branch": fresh}), ("/v1/migrations/lint", {}),
                             ("/v1/tiers/production/promote", {"source": fresh})):
            sent = http.post(route, json={**extra, "dir": str(tmp_path)})
            assert sent.status_code == 422 and "reads no directory" in sent.json()["error"]["message"], route
            none = http.post(route, json=extra)
            assert none.status_code == 400 and "no migration files were sent" in none.json()["error"]["message"]
        evil = http.post("/v1/migrations/status", json={"branch": fresh,
                                                        "files": {"../../etc/V0001__x.sql": "SELECT 1;"}})
        assert evil.status_code == 400 and "not plain .sql file names" in evil.json()["error"]["message"]
        old = http.get("/v1/migrations/status", params={"dir": str(tmp_path)})
        assert old.status_code == 405
    paths: dict[str, Any] = svc.http().get("/openapi.json").json()["paths"]
    for route, ops in paths.items():
        for op in ops.values():
            names = [p["name"] for p in op.get("parameters", [])]
            assert not {"dir", "path", "file"} & set(names), (route, names)


def test_without_dir_the_client_reads_the_migrations_its_tierbase_toml_names(svc: Svc, tmp_path: Path,
                                                                               fresh: str) -> None:
    d = _migrations(tmp_path)
    (tmp_path / "tierbase.toml").write_text(f'[project]\nmigrations = "{d.name}"\n')
    got = subprocess.run([sys.executable, "-m", "tierbase.cli.main", "migrate", "status", "--branch", fresh, "--json"],
                         env=svc.agent_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert [m["label"] for m in json.loads(got.stdout)["pending"]] == ["V0001__widgets"]
    elsewhere = subprocess.run([sys.executable, "-m", "tierbase.cli.main", "migrate", "status", "--branch", fresh],
                               env=svc.agent_env, cwd="/", capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 1 and "no migrations directory is known" in elsewhere.stderr


def test_contents_load_like_the_directory_they_were_read_from(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "V0001__crlf.sql").write_bytes(b"\xef\xbb\xbfCREATE TABLE a (x int);\r\n")
    (d / "U0001__crlf.sql").write_bytes(b"DROP TABLE a;\n")
    (d / "V0002__plain.sql").write_bytes(b"CREATE TABLE b (x int);\n")
    (d / "seeds.sql").write_bytes(b"not sent: not a migration name\n")
    sent = read_dir(d)
    assert sorted(sent) == ["U0001__crlf.sql", "V0001__crlf.sql", "V0002__plain.sql"]
    on_disk, uploaded = discover(d), from_contents(sent)
    assert [(m.label(), m.checksum, m.sql, m.undo_sql) for m in on_disk] == \
        [(m.label(), m.checksum, m.sql, m.undo_sql) for m in uploaded]
    assert all(m.uploaded and m.path == Path(m.path.name) for m in uploaded)
    with pytest.raises(MigrationError, match="undo file"):
        from_contents({"U0003__orphan.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="misnamed"):
        from_contents({"v1_bad.sql": "SELECT 1;"})


def test_lint_over_http_reads_the_contents_and_names_the_file(svc: Svc, tmp_path: Path) -> None:
    d = tmp_path / "lintme"
    d.mkdir()
    (d / "V0001__index.sql").write_text("-- index\n\nCREATE INDEX seed_idx ON seed (id);\n")
    got = tierbase(svc.agent_env, "migrate", "lint", "--dir", str(d), check=False)
    assert got.returncode == 2, got.stderr
    assert "V0001__index.sql:3" in got.stdout and "require-concurrent-index-creation" in got.stdout
    assert str(d) not in got.stdout  # the server only knew the file's name
