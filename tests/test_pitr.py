"""Time travel on real btrfs and Postgres: branch at a past time or LSN, restore a tier in place,
history and retention, bad inputs (nothing made), a corrupt segment, kill -9 during a restore.

A writer logs, for each row, the client's clock just before it sent the INSERT and just after its
commit returned: the commit's timestamp lies between them, so rows whose commit had returned before
T must be on a branch at T and rows sent after T must not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.compute import archive
from tierbase.errors import ArchiveCorrupt, InvalidInput, OutsideHistory, PolicyDenied, Refused

from .conftest import (
    HAVE_BTRFS,
    ROOT,
    as_,
    free_port,
    free_port_base,
    make_home,
    make_principal,
    query,
    serving,
    teardown_platform,
)

pytestmark = pytest.mark.skipif(not (ROOT and HAVE_BTRFS), reason="needs root and btrfs-progs")

CONFIG = """
[tiers.production]
protected = true
entry = true
history = "1d"
base_interval = "1h"
"""


@pytest.fixture(scope="module")
def tb() -> Iterator[Tierbase]:
    """A platform of its own: production runs with archiving from its first start."""
    home = make_home() / "home"
    cfg = home.parent / "tierbase.toml"
    cfg.write_text(CONFIG)
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    t = Tierbase(home)
    try:
        t.init(storage="btrfs", btrfs_size="4G", proxy_port=free_port(), config=str(cfg))
        t.start_branch("production")
        with psycopg.connect(t._url("production", "postgres"), autocommit=True) as conn:
            conn.execute("CREATE TABLE log (id int PRIMARY KEY, note text)")
        t.history_tick()  # the first base snapshot
        with serving(t):
            yield t
    finally:
        teardown_platform(t, home.parent)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class Writer:
    """Inserts rows one at a time into production, logging (id, sent_at, committed_at)."""

    #: the highest id any writer used: ids are never reused, even after a restore dropped them
    high = 0

    def __init__(self, tb: Tierbase) -> None:
        self.conn = psycopg.connect(tb._url("production", "postgres"), autocommit=True)
        row = self.conn.execute("SELECT coalesce(max(id), 0) FROM log").fetchone()
        self.next = max(int(row[0]) if row else 0, Writer.high) + 1
        self.rows: list[tuple[int, float, float]] = []

    def write(self, seconds: float, pause: float = 0.005) -> None:
        end = time.time() + seconds
        while time.time() < end:
            sent = time.time()
            self.conn.execute("INSERT INTO log VALUES (%s, 'w')", (self.next,))
            self.rows.append((self.next, sent, time.time()))
            Writer.high = self.next
            self.next += 1
            time.sleep(pause)

    def split(self, at: float) -> tuple[set[int], set[int]]:
        """(ids committed before ``at``, ids sent after it)."""
        return ({i for i, _, done in self.rows if done < at}, {i for i, sent, _ in self.rows if sent > at})

    def close(self) -> None:
        self.conn.close()


def ids(tb: Tierbase, branch: str) -> set[int]:
    return {int(r[0]) for r in query(tb.branch_url(branch), "SELECT id FROM log")}  # type: ignore[call-overload]


def test_branch_at_a_time_has_exactly_what_was_committed_before_it(tb: Tierbase) -> None:
    w = Writer(tb)
    w.write(1.5)
    t = time.time()
    w.write(1.5)
    w.close()
    info = tb.create_branch("pit-time", "production", at=iso(t))
    before, after = w.split(t)
    got = ids(tb, "pit-time")
    assert before and after
    assert before <= got
    assert not (after & got)
    assert info["kind"] == "feature" and info["target"]["time"].startswith(iso(t)[:19])
    # an ordinary writable branch, through the proxy
    query(tb.branch_url("pit-time"), "INSERT INTO log VALUES (-1, 'on the branch')")
    assert -1 not in ids(tb, "production")
    tb.delete_branch("pit-time")


def test_branch_at_relative_time_and_lsn(tb: Tierbase) -> None:
    w = Writer(tb)
    w.write(0.5)
    with psycopg.connect(tb._url("production", "postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    lsn = str(row[0]) if row else ""
    mark = w.next - 1
    w.write(1.0)
    w.close()
    tb.create_branch("pit-lsn", "production", lsn=lsn)
    got = ids(tb, "pit-lsn")
    assert mark in got and (w.next - 1) not in got
    tb.delete_branch("pit-lsn")
    tb.create_branch("pit-rel", "production", at="-1s")
    assert mark in ids(tb, "pit-rel")
    tb.delete_branch("pit-rel")


def leftovers(tb: Tierbase, name: str) -> list[str]:
    return [v for v in tb.branches.provider.driver.volumes() if v.split(".")[0] == name]


@pytest.mark.parametrize(("at", "lsn", "error", "words"), [
    ("2999-01-01T00:00:00Z", None, OutsideHistory, "in the future"),
    ("2001-01-01T00:00:00Z", None, OutsideHistory, "before the history window"),
    ("yesterday at noon", None, InvalidInput, "does not parse"),
    ("2026-12-01T14:01:30", None, InvalidInput, "no time zone"),
    ("-5x", None, InvalidInput, "does not parse"),
    (None, "FFFFFFFF/0", OutsideHistory, "past the end"),
    (None, "0/zz", InvalidInput, "does not parse"),
    (None, "0/1", OutsideHistory, "before the history window"),
])
def test_bad_targets_are_refused_and_make_nothing(tb: Tierbase, at: str | None, lsn: str | None,
                                                  error: type[Exception], words: str) -> None:
    with pytest.raises(error) as got:
        tb.create_branch("pit-bad", "production", at=at, lsn=lsn)
    assert words in str(got.value)
    assert tb.store.find("pit-bad") is None and leftovers(tb, "pit-bad") == []


def test_both_or_neither_target_and_snapshot_are_refused(tb: Tierbase) -> None:
    with pytest.raises(InvalidInput, match="exactly one"):
        tb.create_branch_at("pit-bad", "production", at="-1s", lsn="0/1")
    with pytest.raises(InvalidInput, match="snapshot"):
        tb.create_branch("pit-bad", "production", at="-1s", snapshot=True)


def test_features_keep_no_history(tb: Tierbase) -> None:
    tb.create_branch("pit-feature", "production")
    tb.start_branch("pit-feature")
    assert tb._compute_settings(tb.store.get("pit-feature")) is None
    with pytest.raises(OutsideHistory, match="keeps no history"):
        tb.take_base_snapshot("pit-feature")
    with pytest.raises(OutsideHistory, match="no history"):
        tb.create_branch("pit-kid", "pit-feature", at="-1s")
    assert tb.store.find("pit-kid") is None
    tb.delete_branch("pit-feature")


def test_policy_is_that_of_branching_the_parent(tb: Tierbase) -> None:
    make_principal(tb, "pit-agent", "agent")
    with pytest.raises(PolicyDenied):
        as_(tb, "pit-agent").create_branch("pit-agent-b", "production", at="-1s")
    with pytest.raises(PolicyDenied):
        as_(tb, "pit-agent").restore("production", at="-1s")
    denied = tb.audit_log(actor="pit-agent")
    assert {r["action"] for r in denied} >= {"branch.create", "promote"}
    assert tb.store.find("pit-agent-b") is None


def test_corrupt_segment_is_refused_naming_it(tb: Tierbase) -> None:
    w = Writer(tb)
    w.write(0.3)
    w.close()
    key = tb.history_log.key(tb.store.get("production"))
    assert key is not None
    wal = tb.history_log.wal_dir(key)
    base = tb.history_log.bases(key)[-1]
    first = archive.parse_lsn(base.redo_lsn)
    # the segment holding the newest base's REDO point: every recovery from that base reads it
    seg = next(s.name for s in archive.segments(wal)
               if (r := archive.segment_range(s.name)) and r[1] <= first < r[2])
    path = wal / seg
    original = path.read_bytes()
    try:
        path.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        with pytest.raises(ArchiveCorrupt) as got:
            tb.create_branch("pit-corrupt", "production", at="-1s")
        assert seg in got.value.message
        assert tb.store.find("pit-corrupt") is None and leftovers(tb, "pit-corrupt") == []
        with pytest.raises(ArchiveCorrupt):
            archive.verify(wal, seg)
    finally:
        path.write_bytes(original)
    archive.verify(wal, seg)


def test_segments_placed_into_pg_wal_are_replayed_and_checked(tb: Tierbase) -> None:
    """The archived segments wholly before the target go into the copy's pg_wal before postgres starts
    (no restore command for them): the branch holds exactly what was committed before T, and a placed
    segment that does not match its recorded sum is refused, naming it, with nothing made."""
    b = tb.store.get("production")
    key = tb.history_log.key(b)
    assert key is not None
    wal = tb.history_log.wal_dir(key)
    tb.take_base_snapshot("production", "test")
    base = tb.history_log.bases(key)[-1]
    w = Writer(tb)
    w.write(0.3)
    dsn = tb.branches.provider.endpoint(b.port).dsn()
    done = str(query(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0])
    deadline = time.time() + 30
    while not (wal / done).exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    t = time.time()
    w.write(0.3)
    w.close()
    before, after = w.split(t)
    made = tb.create_branch("pit-placed", "production", at=iso(t))
    assert made["phases"]["placed_segments"] >= 1
    got = ids(tb, "pit-placed")
    assert before <= got and not (after & got)
    tb.delete_branch("pit-placed")

    first = archive.parse_lsn(base.redo_lsn)
    seg = next(s.name for s in archive.segments(wal)
               if (r := archive.segment_range(s.name)) and r[1] <= first < r[2])
    path = wal / seg
    original = path.read_bytes()
    try:
        path.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        with pytest.raises(ArchiveCorrupt) as err:
            tb.create_branch("pit-placed-bad", "production", at=iso(t))
        assert seg in err.value.message
        assert tb.store.find("pit-placed-bad") is None and leftovers(tb, "pit-placed-bad") == []
    finally:
        path.write_bytes(original)


def test_history_reports_the_window(tb: Tierbase) -> None:
    h = tb.history("production")
    assert h["serving"] == "production" and h["window"] == "1d"
    assert h["oldest"] is not None and h["newest"]["time"] == "now"
    assert h["bases"] and h["bases"][0]["own_bytes"] is not None
    assert h["wal"]["segments"] >= 1 and h["wal"]["bytes"] >= 16 * 1024 * 1024


def test_restore_serves_the_past_keeps_the_replaced_state_and_branching_past_it_works(tb: Tierbase) -> None:
    w = Writer(tb)
    w.write(1.0)
    t = time.time()
    w.write(1.0)
    w.close()
    before, after = w.split(t)
    first = w
    url = tb.branch_url("production")
    port = tb.store.get("production").port
    out = tb.restore("production", at=iso(t))
    kept = out["kept_as"]
    assert kept == "production-before-restore-1" and out["serving"] == "production"
    got = ids(tb, "production")
    assert before <= got and not (after & got)
    # same name, port and URL; the replaced state kept, protected, listed
    assert tb.store.get("production").port == port and tb.branch_url("production") == url
    k = tb.store.get(kept)
    assert k.protected and kept in {b["name"] for b in tb.list_branches(with_bytes=False)}
    assert after <= ids(tb, kept)
    assert kept in tb.history("production")["kept_states"]
    assert [r["outcome"] for r in tb.audit_log(action="promote", target="production")][-2:] in (
        ["intent", "ok"], ["ok", "intent"]) or any(r["outcome"] == "ok" for r in tb.audit_log(action="promote"))
    # the restored tier is on a new timeline, archives it, and can be branched past the restore point
    w = Writer(tb)
    w.write(1.0)
    t2 = time.time()
    w.write(0.5)
    w.close()
    new_before, new_after = w.split(t2)
    tb.create_branch("pit-past-restore", "production", at=iso(t2))
    got = ids(tb, "pit-past-restore")
    assert new_before <= got and not (new_after & got) and not (after & got)
    tli = query(tb._url("production", "postgres"), "SELECT timeline_id FROM pg_control_checkpoint()")[0][0]
    assert int(str(tli)) >= 2
    tb.delete_branch("pit-past-restore")
    # and a point before the restore is still reachable: the base snapshots from before it stay valid
    tb.create_branch("pit-before-restore", "production", at=iso(t - 0.5))
    early, late = first.split(t - 0.5)
    got = ids(tb, "pit-before-restore")
    assert early <= got and not (late & got)
    tb.delete_branch("pit-before-restore")


def test_a_kept_state_is_protected_until_a_platform_engineer_deletes_it(tb: Tierbase) -> None:
    kept = [b.name for b in tb.store.all() if b.name.startswith("production-before-restore-")]
    assert kept, "the restore test keeps the replaced state"
    make_principal(tb, "pit-kept-dev", "developer")
    make_principal(tb, "pit-kept-bot", "agent")
    for who in ("pit-kept-dev", "pit-kept-bot"):
        with pytest.raises((PolicyDenied, Refused)):
            as_(tb, who).delete_branch(kept[0])
    with pytest.raises(Refused, match="protected"):
        tb.reset_branch(kept[0])
    tb.sweep(now=time.time() + 400 * 86400)  # no TTL: the sweeper never takes it
    assert tb.store.find(kept[0]) is not None
    serving = tb.store.resolve_route("production")
    with pytest.raises(Refused, match="protected"):  # the tier itself stays protected for everyone
        tb.delete_branch(str(serving))
    assert tb.delete_branch(kept[0]) == [kept[0]]  # the platform engineer, on purpose
    assert tb.store.find(kept[0]) is None and tb.store.resolve_route("production") == serving
    record = tb.audit_log(action="branch.delete", target=kept[0])[-1]
    assert record["after"]["kept_states"] == [kept[0]]
    assert ids(tb, "production")  # the tier serves as before


def test_retention_prunes_only_what_the_window_does_not_need(tb: Tierbase) -> None:
    b = tb.store.get("production")
    key = tb.history_log.key(b)
    assert key is not None
    tb.take_base_snapshot("production")
    tb.take_base_snapshot("production")
    bases = tb.history_log.bases(key)
    assert len(bases) >= 3
    wal = tb.history_log.wal_dir(key)
    # a window that starts just after the second newest base: everything older than it goes
    keep = bases[-2]
    said = tb.history_log.prune(key, keep_seconds=10.0, now=keep.taken_at + 10.0 + 0.001)
    left = tb.history_log.bases(key)
    assert [x.id for x in left] == [keep.id, bases[-1].id] and said
    floor = archive.parse_lsn(keep.redo_lsn)
    for s in archive.segments(wal):
        r = archive.segment_range(s.name)
        assert r is None or r[2] > floor, f"{s.name} was needed by no point and should be gone"
    # the start of the window is still reachable
    tb.create_branch("pit-window", "production", at=iso(keep.taken_at + 0.01))
    tb.delete_branch("pit-window")
    # the sweeper's own pass keeps it too
    assert not any("pruned base" in line for line in tb.history_tick())


def die_at(tb: Tierbase, failpoint: str, code: str) -> None:
    script = f"from tierbase import Tierbase\ntb = Tierbase({str(tb.home.root)!r})\n{code}\n"
    env = dict(os.environ, TIERBASE_FAILPOINTS=failpoint, PYTHONPATH=str(Path(__file__).parent.parent))
    got = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert got.returncode == -signal.SIGKILL, got.stderr


@pytest.mark.parametrize(("point", "new"), [("restore:reserved", False), ("restore:recovered", False),
                                            ("restore:stopped", False), ("restore:swapped", True)])
def test_kill_during_restore_serves_the_old_state_or_the_new(tb: Tierbase, point: str, new: bool) -> None:
    w = Writer(tb)
    w.write(0.5)
    t = time.time()
    w.write(0.5)
    w.close()
    now_ids = ids(tb, "production")
    names = {b.name for b in tb.store.all()}
    die_at(tb, point, f"tb.restore('production', at={iso(t)!r})")
    tb.reconcile()
    got = ids(tb, "production")
    if new:
        assert not (w.split(t)[1] & got) and w.split(t)[0] <= got
        kept = ({b.name for b in tb.store.all()} - names).pop()
        assert ids(tb, kept) == now_ids
    else:
        assert got == now_ids
        assert {b.name for b in tb.store.all()} == names
    assert all(b.state.value == "ready" for b in tb.store.all())


def test_http_api_history_branch_at_and_restore_refusal(tb: Tierbase) -> None:
    from fastapi.testclient import TestClient

    from tierbase.api.server import create_app

    api = TestClient(create_app(tb))
    owner = {"Authorization": f"Bearer {tb.home.read_secret(tb.home.token)}"}
    h = api.get("/v1/tiers/production/history?bytes=false", headers=owner)
    assert h.status_code == 200 and h.json()["oldest"] is not None
    bad = api.post("/v1/branches", headers=owner, json={"name": "pit-http", "parent": "production",
                                                        "at": "2999-01-01T00:00:00Z"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "outside_history"
    ok = api.post("/v1/branches", headers=owner, json={"name": "pit-http", "parent": "production", "at": "-1s"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["target"]["time"] and tb.store.find("pit-http") is not None
    tb.delete_branch("pit-http")
    bot = tb.create_principal("pit-bot", "agent")["token"]
    refused = api.post("/v1/tiers/production/restore", headers={"Authorization": f"Bearer {bot}"},
                       json={"at": "-1s"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied"
    assert not any(b.name.startswith("production-before-restore-") and b.state.value != "ready"
                   for b in tb.store.all())


def test_cli_parses_relative_times() -> None:
    from click.testing import CliRunner

    from tierbase.cli.main import cli

    got = CliRunner().invoke(cli, ["branch", "create", "x", "--at", "-5m", "--help"])
    assert got.exit_code == 0 and "--lsn" in got.output
    got = CliRunner().invoke(cli, ["restore", "--help"])
    assert got.exit_code == 0 and "before-restore" in got.output
    got = CliRunner().invoke(cli, ["history", "--help"])
    assert got.exit_code == 0


def test_archive_script_takes_every_file_postgres_archives_and_refuses_others(tmp_path: Path) -> None:
    script = archive.install_script(tmp_path / "bin")
    wal = tmp_path / "wal"
    wal.mkdir()
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    names = ["000000010000000000000004", "000000010000000000000004.partial", "00000002.history",
             "000000010000000000000004.00000028.backup"]
    for name in names:
        assert subprocess.run([str(script), "archive", str(wal), str(src), name]).returncode == 0
        archive.verify(wal, name)
        # archiving the same file again is fine; other contents under the same name are not
        assert subprocess.run([str(script), "archive", str(wal), str(src), name]).returncode == 0
    (tmp_path / "other").write_bytes(b"y" * 1000)
    assert subprocess.run([str(script), "archive", str(wal), str(tmp_path / "other"), names[0]],
                          capture_output=True).returncode == 1
    for bad in ("../../etc/passwd", "x; rm -rf /", ""):
        got = subprocess.run([str(script), "archive", str(wal), str(src), bad], capture_output=True, text=True)
        assert got.returncode == 127 and "refusing" in got.stderr
    out = tmp_path / "restored"
    assert subprocess.run([str(script), "restore", str(wal), names[0], str(out)]).returncode == 0
    assert out.read_bytes() == src.read_bytes()
    assert subprocess.run([str(script), "restore", str(wal), "000000010000000000000009", str(out)]).returncode == 1


def test_which_segments_are_placed_and_which_preallocated_files_go(tmp_path: Path) -> None:
    """Placed: from the REDO point's segment, contiguous, on the base's timeline, wholly before the target
    (an LSN, or archived before a time); none once the archive holds a later timeline. Dropped: only the
    copy's files past the segment after the base's end of WAL."""
    wal = tmp_path / "wal"
    wal.mkdir()
    seg = archive.SEGMENT_BYTES
    for i, mtime in ((2, 100.0), (3, 200.0), (4, 300.0), (6, 400.0)):
        (wal / f"00000001000000000000000{i}").write_bytes(b"")
        os.utime(wal / f"00000001000000000000000{i}", (mtime, mtime))
    (wal / "000000010000000000000005.partial").write_bytes(b"")
    redo = archive.format_lsn(2 * seg + 100)
    names = [f"00000001000000000000000{i}" for i in (2, 3, 4)]
    assert archive.to_place(wal, redo, 1, at=1000.0) == names  # the gap at 5 ends it
    assert archive.to_place(wal, redo, 1, at=250.0) == names[:2]  # 4 was archived after T
    assert archive.to_place(wal, redo, 1, lsn=archive.format_lsn(4 * seg + 5)) == names[:2]  # T inside 4
    assert archive.to_place(wal, redo, 1, lsn=archive.format_lsn(4 * seg)) == names[:2]
    assert archive.to_place(wal, archive.format_lsn(1 * seg), 1, at=1000.0) == []  # no segment 1
    (wal / "00000002.history").write_text("1\t0/4000000\tno reason\n")
    assert archive.to_place(wal, redo, 1, at=1000.0) == []
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    for name in ("000000010000000000000002", "000000010000000000000003", "000000010000000000000004",
                 "000000010000000000000009", "000000020000000000000009", "00000002.history"):
        (pg_wal / name).write_bytes(b"")
    assert archive.drop_preallocated(pg_wal, 1, archive.format_lsn(2 * seg + 100)) == 2
    assert sorted(p.name for p in pg_wal.iterdir()) == [
        "000000010000000000000002", "000000010000000000000003", "00000002.history", "000000020000000000000009"]


def test_a_transaction_open_at_the_target_is_not_on_the_branch(tb: Tierbase) -> None:
    url = tb._url("production", "postgres")
    with psycopg.connect(url) as open_tx, psycopg.connect(url, autocommit=True) as other:
        open_tx.execute("INSERT INTO log VALUES (-100, 'in flight at T')")
        other.execute("INSERT INTO log VALUES (-101, 'committed before T')")
        time.sleep(0.05)
        t = time.time()
        time.sleep(0.05)
        open_tx.commit()  # commits after T
    tb.create_branch("pit-inflight", "production", at=iso(t))
    got = ids(tb, "pit-inflight")
    assert -101 in got and -100 not in got
    tb.delete_branch("pit-inflight")


def test_failing_archiving_warns_the_tier_keeps_serving_and_catches_up(tb: Tierbase) -> None:
    b = tb.store.get("production")
    key = tb.history_log.key(b)
    assert key is not None
    wal = tb.history_log.wal_dir(key)
    wal.chmod(0o500)  # the archiver (the compute user) cannot write: as on a full pool
    try:
        with psycopg.connect(tb.branches.provider.endpoint(b.port).dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO log VALUES (-200, 'while archiving fails')")
            conn.execute("SELECT pg_switch_wal()")
            deadline = time.time() + 30
            while not tb.history_warnings() and time.time() < deadline:
                time.sleep(0.2)
        assert any("archiving is failing" in w for w in tb.status()["warnings"])
        assert -200 in ids(tb, "production")  # still serving
    finally:
        wal.chmod(0o700)
    deadline = time.time() + 90
    while tb.history_warnings() and time.time() < deadline:
        time.sleep(0.5)
    assert tb.history_warnings() == []
    arch = tb.history("production", with_bytes=False)["archiver"]
    assert arch is not None and not arch["failing"]


def test_the_replay_waits_for_a_segment_the_archiver_is_still_copying(tb: Tierbase) -> None:
    """A branch at a time starts replaying before the tier's archiver has copied the segment holding
    the target; the restore command waits for that segment (and only that one) instead of ending the
    replay short of the target."""
    b = tb.store.get("production")
    key = tb.history_log.key(b)
    assert key is not None
    wal = tb.history_log.wal_dir(key)
    dsn = tb.branches.provider.endpoint(b.port).dsn()
    query(dsn, "INSERT INTO log VALUES (-300, 'before T, in the segment still to archive')")
    t = time.time()
    time.sleep(0.05)
    query(dsn, "INSERT INTO log VALUES (-301, 'after T')")

    fired: list[float] = []

    def archiver_back() -> None:  # a new segment wakes the archiver, which then retries at once
        fired.append(time.monotonic())
        wal.chmod(0o700)
        query(dsn, "INSERT INTO log VALUES (-302, 'wakes the archiver')")
        query(dsn, "SELECT pg_switch_wal()")

    wal.chmod(0o500)  # the archiver cannot copy anything for a while
    later = threading.Timer(4.0, archiver_back)
    later.start()
    called = time.monotonic()
    try:
        made = tb.create_branch("pit-slow", "production", at=iso(t))
    finally:
        later.join()
        wal.chmod(0o700)
    got = ids(tb, "pit-slow")
    assert -300 in got and -301 not in got and -302 not in got
    # the replay began before the archiver could copy anything: it did not wait for it first
    assert called + made["phases"]["archive_ms"] / 1000 < fired[0]
    tb.delete_branch("pit-slow")


def test_cli_through_the_service_history_branch_at_restore() -> None:
    """The user's path: `tierbase up` (the service as the compute user; its sweeper takes the first base
    snapshot), then history, branch create --at and restore through the CLI and the API."""
    from .test_cli import as_json, leftovers, new_env, tierbase

    home = make_home() / "home"
    cfg = home.parent / "tierbase.toml"
    cfg.write_text(CONFIG)
    e = new_env(home, TIERBASE_SWEEP_INTERVAL="1")
    try:
        as_json(e, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()),
                "--config", str(cfg))
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        url = as_json(e, "branch", "url", "production")["url"]
        query(url, "CREATE TABLE t (id int)")
        deadline = time.time() + 60
        while not as_json(e, "history", "production")["bases"] and time.time() < deadline:
            time.sleep(0.5)
        query(url, "INSERT INTO t VALUES (1)")
        time.sleep(0.2)
        t = time.time()
        time.sleep(0.2)
        query(url, "INSERT INTO t VALUES (2)")
        b = as_json(e, "branch", "create", "cli-pit", "--parent", "production", "--at", iso(t))
        assert b["target"]["time"]
        pit_url = as_json(e, "branch", "url", "cli-pit")["url"]
        assert query(pit_url, "SELECT id FROM t") == [(1,)]
        bad = tierbase(e, "branch", "create", "cli-bad", "--parent", "production", "--at", "-5x", check=False)
        assert bad.returncode == 1 and "does not parse" in bad.stderr
        r = as_json(e, "restore", "production", "--at", iso(t))
        assert r["kept_as"] == "production-before-restore-1"
        assert query(url, "SELECT id FROM t") == [(1,)]
        h = as_json(e, "history", "production")
        assert h["kept_states"] == ["production-before-restore-1"] and h["wal"]["segments"] >= 1
        text = tierbase(e, "history", "production").stdout
        assert "restorable from" in text and "kept states" in text
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        import shutil

        shutil.rmtree(home.parent, ignore_errors=True)
