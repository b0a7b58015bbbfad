"""The audit trail cannot lose its tail: head anchored outside meta.db, mirror checked, floods folded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tierbase import Tierbase
from tierbase.compute import compute_user, pid_alive
from tierbase.compute.roles import READER_ROLE
from tierbase.control.store import Store
from tierbase.governance.anchor import Head, HeadFile
from tierbase.governance.audit import AuditLog
from tierbase.launch import spawn_service

from .conftest import free_port, needs_root_btrfs, query

KEY = b"test-audit-key"


def append(log: AuditLog, n: int, action: str = "test.anchor") -> None:
    for i in range(n):
        log.append(actor="tester", action=action, target=f"t{i}", allowed=True, reason="for the test")


def verify(tb: Tierbase) -> dict[str, Any]:
    return tb.audit_verify()


@contextmanager
def raw(tb: Tierbase) -> Iterator[sqlite3.Connection]:
    """meta.db as anyone with write access to the file sees it (no tierbase code in between)."""
    db = sqlite3.connect(tb.home.db, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def as_superuser_bypassing_triggers(tb: Tierbase) -> Iterator[psycopg.Connection[Any]]:
    """The mirror as the one role that can still change it: a superuser who turns triggers off."""
    b = tb.store.get("tierbase-audit")
    with psycopg.connect(tb.branches.provider.endpoint(b.port).dsn(), autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        yield conn


# -- without a platform: the log on a bare store ------------------------------------------------
@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    store = Store(tmp_path / "meta.db")
    yield AuditLog(store, KEY)
    store.close()


def test_a_clean_chain_verifies_with_its_head(log: AuditLog) -> None:
    assert log.verify().ok and log.verify().records == 0
    append(log, 5)
    v = log.verify()
    assert (v.ok, v.records, v.head, v.note) == (True, 5, 5, "")


def test_deleting_the_newest_records_is_named(log: AuditLog) -> None:
    append(log, 10)
    with closing(sqlite3.connect(log.store.path)) as db, db:
        db.execute("DELETE FROM audit WHERE id > 7")
    v = log.verify()
    assert not v.ok and v.first_bad == 8
    assert v.problem == "the chain ends at record 7 but the head says 10 (records 8..10 are missing)"


def test_deleting_every_record_and_the_database_head_is_named(log: AuditLog) -> None:
    append(log, 3)
    with closing(sqlite3.connect(log.store.path)) as db, db:
        db.execute("DELETE FROM audit")
        db.execute("DELETE FROM audit_head")
    v = log.verify()
    assert not v.ok and "replaced by an older copy" in v.problem and "records 1..3 are missing" in v.problem


def test_a_forged_or_erased_head_file_fails(log: AuditLog) -> None:
    append(log, 4)
    saved = log.head.path.read_bytes()
    # someone who can write the file but not read the key: a newer head cannot be made up
    forger = HeadFile(log.head.path, b"not the audit key")
    with forger.locked(True) as fd:
        forger.write(fd, Head(8, "0" * 64))
        forger.write(fd, Head(9, "0" * 64))
    v = log.verify()
    assert not v.ok and "not signed with the audit key" in v.problem
    log.head.path.write_bytes(b"")
    assert "missing, empty" in log.verify().problem
    log.head.path.write_bytes(saved)
    assert log.verify().ok


def test_a_torn_head_write_leaves_the_previous_head(log: AuditLog) -> None:
    append(log, 4)  # slot 0 holds head 4, slot 1 head 3
    with log.head.locked(True) as fd:
        os.pwrite(fd, b"tierbase-audit-head/1 4 0123", 0)  # half a write over the newest slot
    v = log.verify()
    assert v.ok and v.head == 3 and "lags by the last record (4)" in v.note


def test_an_older_head_file_is_named(log: AuditLog) -> None:
    append(log, 2)
    old = log.head.path.read_bytes()
    append(log, 3)
    log.head.path.write_bytes(old)
    v = log.verify()
    assert not v.ok
    assert v.problem == "the head file was replaced by an older copy: it says record 2 but the chain ends at 5"


def test_a_crash_between_commit_and_head_write_is_a_lag_of_one(log: AuditLog) -> None:
    append(log, 3)
    code = ("import sys\nfrom pathlib import Path\nfrom tierbase.control.store import Store\n"
            "from tierbase.governance.audit import AuditLog\n"
            f"log = AuditLog(Store(Path({str(log.store.path)!r})), {KEY!r})\n"
            "log.append(actor='crash', action='test.crash', target='x', allowed=True, reason='dies after commit')\n")
    got = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TIERBASE_FAILPOINTS="audit:committed"),
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == -signal.SIGKILL, got.stderr
    v = log.verify()
    assert v.ok and v.records == 4 and v.head == 3
    assert "lags by the last record (4)" in v.note
    # the next start (opening the log) writes the missing head: deleting that record is then named
    reopened = AuditLog(log.store, KEY)
    assert (reopened.verify().head, reopened.verify().note) == (4, "")
    with closing(sqlite3.connect(log.store.path)) as db, db:
        db.execute("DELETE FROM audit WHERE id = 4")
        db.execute("UPDATE audit_head SET id = 3, hash = (SELECT hash FROM audit WHERE id = 3)")
    v = log.verify()
    assert not v.ok and v.problem == ("the database was replaced by an older copy: its chain ends at record 3 "
                                      "but the head says 4 (record 4 is missing)")


def test_the_next_append_catches_up_after_a_crash(log: AuditLog) -> None:
    append(log, 2)
    with log.head.locked(True) as fd:
        before = os.pread(fd, 8192, 0)
    append(log, 1)
    with log.head.locked(True) as fd:  # put back the head as a crash before its write would have left it
        os.pwrite(fd, before, 0)
    assert log.verify().note
    append(log, 1)
    v = log.verify()
    assert v.ok and v.head == 4 and v.note == ""


def test_concurrent_appenders_in_threads_and_processes_keep_the_head(log: AuditLog) -> None:
    code = ("from pathlib import Path\nfrom tierbase.control.store import Store\n"
            "from tierbase.governance.audit import AuditLog\n"
            f"log = AuditLog(Store(Path({str(log.store.path)!r})), {KEY!r})\n"
            "for i in range(60):\n"
            "    log.append(actor='other', action='test.proc', target='p', allowed=True, reason='r')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    threads = [threading.Thread(target=append, args=(log, 60)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(120) for p in procs] == [0, 0]
    v = log.verify()
    assert (v.ok, v.records, v.head, v.note) == (True, 300, 300, "")


def test_a_chain_made_before_heads_is_anchored_on_first_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "meta.db")
    log = AuditLog(store, KEY)
    append(log, 3)
    store.close()
    with closing(sqlite3.connect(store.path)) as db, db:
        db.execute("DROP TABLE audit_head")
        db.execute("PRAGMA user_version = 0")  # as a data dir from before schema versions were kept
    log.head.path.unlink()
    store = Store(tmp_path / "meta.db")
    again = AuditLog(store, KEY)
    v = again.verify()
    assert (v.ok, v.head) == (True, 3)
    store.close()


# -- the aggregator: bounded records, counts that add up ----------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # on a minute boundary

    def __call__(self) -> float:
        return self.now


def auth_records(log: AuditLog, after: int = 0) -> list[dict[str, Any]]:
    return [r for r in log.query(action="auth", limit=100_000) if r["id"] > after]


def test_failures_fold_per_source_and_minute(log: AuditLog) -> None:
    clock = Clock()
    log.failures.clock = clock
    for _ in range(50):
        log.note_failure("10.0.0.1", "anonymous", "auth", "the API token is not known")
    log.note_failure("10.0.0.2", "anonymous", "auth", "the API token is missing or malformed")
    recs = auth_records(log)
    assert [(r["target"], r["after"]["count"]) for r in recs] == [("10.0.0.1", 1), ("10.0.0.2", 1)]
    clock.now += 61  # the next minute: the first failure there closes the last minute's window
    log.note_failure("10.0.0.1", "anonymous", "auth", "the API token is not known")
    recs = auth_records(log)
    summary = recs[2]
    assert summary["target"] == "10.0.0.1" and summary["after"]["count"] == 49 and summary["after"]["summary"]
    assert summary["decision"] == "denied" and summary["reason"].startswith("49 more failed auth attempts")
    assert summary["after"]["reasons"] == {"the API token is not known": 49}
    assert recs[3]["after"]["count"] == 1  # the new minute's first failure, at once
    assert log.flush() == 0 and log.verify().ok


def test_many_sources_fold_into_one_key_beyond_the_cap(log: AuditLog) -> None:
    log.failures.clock = Clock()
    log.failures.max_keys = 5
    for i in range(40):
        log.note_failure(f"10.1.0.{i}", "anonymous", "auth", "bad")
    assert log.flush() == 1
    recs = auth_records(log)
    assert len(recs) == 7 and recs[5]["target"] == "*" and sum(r["after"]["count"] for r in recs) == 40


def test_a_window_closes_by_itself(tmp_path: Path) -> None:
    store = Store(tmp_path / "meta.db")
    log = AuditLog(store, KEY, window=0.5)
    for _ in range(10):
        log.note_failure("10.2.0.1", "anonymous", "auth", "bad")
    deadline = time.monotonic() + 5
    while log.failures.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    recs = auth_records(log)
    assert log.failures.pending() == 0 and sum(r["after"]["count"] for r in recs) == 10 and len(recs) <= 4
    store.close()


# -- on a real platform: the database, the mirror, the service ---------------------------------------
@needs_root_btrfs
def test_a_clean_platform_trail_and_mirror_verify(platform: Tierbase) -> None:
    append(platform.gate.audit, 20)
    platform.audit_sync()  # makes and fills the mirror
    v = verify(platform)
    assert v["ok"] and v["head"] == v["records"] and v["mirror"]["ok"]
    assert v["mirror"]["synced_to"] == v["records"]


@needs_root_btrfs
def test_truncated_audit_table_is_detected(platform: Tierbase) -> None:
    append(platform.gate.audit, 3)
    with raw(platform) as db:
        n = db.execute("SELECT max(id) FROM audit").fetchone()[0]
        saved = db.execute("SELECT * FROM audit WHERE id > ?", (n - 3,)).fetchall()
        db.execute("DELETE FROM audit WHERE id > ?", (n - 3,))
    try:
        v = verify(platform)
        assert not v["ok"] and v["first_bad"] == n - 2
        assert v["problem"] == f"the chain ends at record {n - 3} but the head says {n} " \
                               f"(records {n - 2}..{n} are missing)"
    finally:
        with raw(platform) as db:
            db.executemany(f"INSERT INTO audit VALUES ({','.join('?' * 12)})", saved)
    assert verify(platform)["ok"]


@needs_root_btrfs
def test_a_database_put_back_from_an_older_copy_is_detected(platform: Tierbase, tmp_path: Path) -> None:
    older, newer = tmp_path / "older.db", tmp_path / "newer.db"
    with raw(platform) as db, closing(sqlite3.connect(older)) as copy:
        db.backup(copy)
        n = db.execute("SELECT max(id) FROM audit").fetchone()[0]
    append(platform.gate.audit, 2)
    with raw(platform) as db, closing(sqlite3.connect(newer)) as copy:
        db.backup(copy)
    with raw(platform) as db, closing(sqlite3.connect(older)) as copy:
        copy.backup(db)  # put the copy back
    try:
        v = verify(platform)
        assert not v["ok"] and v["first_bad"] == n + 1
        assert v["problem"] == f"the database was replaced by an older copy: its chain ends at record {n} " \
                               f"but the head says {n + 2} (records {n + 1}..{n + 2} are missing)"
    finally:
        with raw(platform) as db, closing(sqlite3.connect(newer)) as copy:
            copy.backup(db)
    assert verify(platform)["ok"]


@needs_root_btrfs
@pytest.mark.parametrize("change", ["delete", "edit", "delete-newest", "add"])
def test_a_changed_mirror_row_is_named(platform: Tierbase, change: str) -> None:
    append(platform.gate.audit, 20)
    platform.audit_sync()
    top = int(platform.store.get_setting("audit_mirror_to"))
    victim = top if change == "delete-newest" else 17
    with as_superuser_bypassing_triggers(platform) as su:
        saved = su.execute("SELECT * FROM audit_log WHERE id = %s", (victim,)).fetchone()
        if change in ("delete", "delete-newest"):
            su.execute("DELETE FROM audit_log WHERE id = %s", (victim,))
        elif change == "edit":
            su.execute("UPDATE audit_log SET decision = CASE decision WHEN 'allowed' THEN 'denied' ELSE 'allowed' END,"
                       " reason = 'nothing to see' WHERE id = %s", (victim,))
        else:
            su.execute("INSERT INTO audit_log SELECT id + 1000, ts, actor, action, target, decision, reason, "
                       "outcome, before, after, prev_hash, hash FROM audit_log WHERE id = %s", (victim,))
    try:
        v = verify(platform)
        want = {"delete": f"mirror row {victim} is missing", "delete-newest": f"mirror row {victim} is missing",
                "edit": f"mirror row {victim} differs from the chain (decision, reason)",
                "add": f"mirror row {victim + 1000} is not in the chain"}[change]
        assert not v["ok"] and v["mirror"]["problem"] == want and v["problem"] == want
        assert v["mirror"]["problems"] == [want]
    finally:
        with as_superuser_bypassing_triggers(platform) as su:
            su.execute("DELETE FROM audit_log WHERE id = %s OR id = %s", (victim, victim + 1000))
            su.execute("INSERT INTO audit_log VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                       [json.dumps(x) if isinstance(x, dict | list) else x for x in saved])
    assert verify(platform)["ok"]


@needs_root_btrfs
def test_the_mirror_is_writable_by_no_role(platform: Tierbase) -> None:
    url = platform.audit_url()  # through the proxy, which logs readers in to the mirror as tb_reader
    with psycopg.connect(url, autocommit=True) as reader:
        assert reader.execute("SELECT current_user").fetchone()[0] == READER_ROLE
        reader.execute("SET default_transaction_read_only = off")  # the read-only default is not the guard
        assert reader.execute("SELECT count(*) FROM audit_log").fetchone()[0] > 0
        for stmt in ("INSERT INTO audit_log SELECT id + 5000, ts, actor, action, target, decision, reason, "
                     "outcome, before, after, prev_hash, hash FROM audit_log LIMIT 1",
                     "UPDATE audit_log SET reason = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(stmt)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
    b = platform.store.get("tierbase-audit")
    su_dsn = platform.branches.provider.endpoint(b.port).dsn()
    owner, acl = query(su_dsn, "SELECT relowner::regrole::text, relacl::text[] FROM pg_class "
                               "WHERE oid = 'audit_log'::regclass")[0]
    assert owner == "tierbase"
    grants = {a.split("=")[0]: a.split("=")[1].split("/")[0] for a in acl}  # type: ignore[union-attr]
    assert grants == {"tierbase": "arwdDxt", READER_ROLE: "r"}, acl
    # even the owner cannot change or empty it while the triggers stand
    for stmt in ("UPDATE audit_log SET reason = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            query(su_dsn, stmt)
    assert verify(platform)["ok"]


@contextmanager
def running_service(platform: Tierbase, tmp_path: Path) -> Iterator[str]:
    """The real background service on the test platform's data dir (own ports); yields its API URL.

    Stopped with SIGTERM, as `tierbase down` does: a clean stop writes its pending folded failures.
    """
    ports = {k: platform.store.get_setting(k) for k in ("api_port", "proxy_port")}
    platform.store.set_setting("api_port", free_port())
    platform.store.set_setting("proxy_port", free_port())
    try:
        # started as `tierbase up` starts it: the data dir handed to the compute user, the service as that user
        user = compute_user()
        platform.home.hand_over(user)
        info = spawn_service(platform.home, user)
        try:
            yield str(info["api_url"])
        finally:
            pid = int(info["pid"])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_alive(pid), platform.home.service_log.read_text()[-2000:]
    finally:
        for k, v in ports.items():  # whatever happened: the session's proxy keeps its port
            platform.store.set_setting(k, v)


@needs_root_btrfs
def test_cli_audit_verify_names_the_missing_records_and_exits_1(platform: Tierbase, tmp_path: Path) -> None:
    append(platform.gate.audit, 2)
    env = dict(os.environ, TIERBASE_HOME=str(platform.home.root),
               TIERBASE_TOKEN=platform.home.token.read_text().strip())
    cli = [sys.executable, "-m", "tierbase.cli.main", "audit", "verify"]
    with running_service(platform, tmp_path):
        good = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
        assert good.returncode == 0 and "audit trail intact" in good.stdout, good.stderr
        with raw(platform) as db:
            n = db.execute("SELECT max(id) FROM audit").fetchone()[0]
            saved = db.execute("SELECT * FROM audit WHERE id = ?", (n,)).fetchall()
            db.execute("DELETE FROM audit WHERE id = ?", (n,))
        try:
            bad = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
            as_json = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=120)
        finally:
            with raw(platform) as db:
                db.executemany(f"INSERT INTO audit VALUES ({','.join('?' * 12)})", saved)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith(f"Error: the audit trail is broken at record {n}: the chain ends at "
                                         f"record {n - 1} but the head says {n} (record {n} is missing)."), bad.stderr
    assert as_json.returncode == 1
    error = json.loads(as_json.stdout)["error"]
    assert error["data"]["verdict"]["first_bad"] == n and error["message"] == bad.stderr.split(". ")[0][7:]
    assert verify(platform)["ok"]


@needs_root_btrfs
def test_a_flood_of_bad_tokens_grows_the_trail_by_a_bounded_count(platform: Tierbase, tmp_path: Path) -> None:
    """10,000 failed authentications: 9,700 through the aggregator, 300 real HTTP requests to a real service."""
    audit = platform.gate.audit
    start = audit.query(limit=1)[-1]["id"]
    with running_service(platform, tmp_path) as api:

        def http() -> None:
            with httpx.Client(base_url=api, timeout=30) as client:
                for i in range(300):
                    header = f"Bearer tbt_bogus{i}" if i % 3 else "Bearer x"
                    got = client.get("/v1/branches", headers={"Authorization": header})
                    assert got.status_code == 401 and got.json()["error"]["code"] == "unauthorized"

        def direct(source: str, n: int) -> None:
            for _ in range(n):
                audit.note_failure(source, "anonymous", "auth", "the API token is not known")

        workers = [threading.Thread(target=http)]
        workers += [threading.Thread(target=direct, args=(f"10.9.0.{i}", 1385 if i else 1390)) for i in range(7)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    audit.flush()
    recs = [r for r in audit.query(action="auth", limit=100_000) if r["id"] > start]
    by_source: dict[str, int] = {}
    for r in recs:
        by_source[r["target"]] = by_source.get(r["target"], 0) + r["after"]["count"]
    assert sum(by_source.values()) == 10_000
    assert by_source.pop("127.0.0.1") == 300
    assert sorted(by_source.values()) == [1385] * 6 + [1390]
    # 8 sources, at most 2 records each per minute; the run may straddle one minute boundary
    assert len(recs) <= 2 * 8 * 2, [(r["target"], r["after"]["count"]) for r in recs]
    assert verify(platform)["ok"]
