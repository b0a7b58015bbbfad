"""Branch semantics on a real platform: btrfs subvolumes and real postgres computes."""

from __future__ import annotations

import secrets
import threading

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import BranchExists, BranchNotFound, InvalidInput, InvalidName, Refused

from .conftest import query


def url(tb: Tierbase, name: str) -> str:
    return tb.branch_url(name, direct=True)


def started(tb: Tierbase, name: str) -> str:
    tb.start_branch(name)
    return url(tb, name)


def test_branch_sees_parent_commits_made_just_before_create(platform: Tierbase) -> None:
    """Every transaction committed before `create` returned is on the branch, even with the parent serving writes."""
    marker = secrets.token_hex(6)
    with psycopg.connect(url(platform, "production"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS marks (m text)")
        conn.execute("INSERT INTO marks VALUES (%s)", (marker,))
        # an open transaction at fork time must NOT be visible on the branch
        with psycopg.connect(url(platform, "production")) as uncommitted:
            uncommitted.execute("INSERT INTO marks VALUES ('in-flight')")
            info = platform.create_branch(f"b-{marker}")
            uncommitted.rollback()
    try:
        assert info["driver"] == "btrfs" and info["copy_on_write"] is True
        assert info["fork_lsn"]
        got = query(started(platform, f"b-{marker}"), "SELECT m FROM marks WHERE m IN (%s, 'in-flight')", marker)
        assert got == [(marker,)]
    finally:
        platform.delete_branch(f"b-{marker}")


def test_writes_are_isolated_both_ways(platform: Tierbase, branch: str) -> None:
    b_url = started(platform, branch)
    query(b_url, "INSERT INTO seed VALUES (100001, 'branch only')")
    query(b_url, "DELETE FROM seed WHERE id = 1")
    prod = url(platform, "production")
    query(prod, "INSERT INTO seed VALUES (100002, 'parent only')")
    try:
        assert query(prod, "SELECT count(*) FROM seed WHERE id IN (1, 100001)") == [(1,)]
        assert query(b_url, "SELECT count(*) FROM seed WHERE id IN (1, 100001, 100002)") == [(1,)]
        assert query(b_url, "SELECT label FROM seed WHERE id = 100001") == [("branch only",)]
    finally:
        query(prod, "DELETE FROM seed WHERE id = 100002")


def test_branch_of_branch_and_snapshot(platform: Tierbase, branch: str) -> None:
    query(started(platform, branch), "CREATE TABLE level1 (x int); INSERT INTO level1 VALUES (1)")
    child = f"{branch}-c"
    snap = f"{branch}-s"
    platform.create_branch(child, branch)
    platform.create_branch(snap, branch, snapshot=True)
    assert query(started(platform, child), "SELECT x FROM level1") == [(1,)]
    info = platform.get_branch(snap)
    assert info["kind"] == "snapshot" and info["compute"] == "none"
    with pytest.raises(Refused, match="read-only snapshot"):
        platform.start_branch(snap)
    # a snapshot is read-only at the storage level too
    path = platform.branches.provider.datadir(platform.store.get(snap).volume)
    with pytest.raises(OSError):
        (path / "tierbase-probe").write_text("x")
    # but it can be the parent of a writable branch
    from_snap = f"{branch}-fs"
    platform.create_branch(from_snap, snap)
    assert query(started(platform, from_snap), "SELECT x FROM level1") == [(1,)]


def test_reset_keeps_name_and_port_and_drops_changes(platform: Tierbase, branch: str) -> None:
    b_url = started(platform, branch)
    port = platform.get_branch(branch)["port"]
    query(b_url, "DELETE FROM seed")
    query(url(platform, "production"), "CREATE TABLE after_fork (x int)")
    try:
        info = platform.reset_branch(branch)
        assert info["port"] == port and info["compute"] == "running"
        assert query(b_url, "SELECT count(*) FROM seed") == [(1000,)]
        assert query(b_url, "SELECT to_regclass('after_fork') IS NOT NULL") == [(True,)]
        volumes = platform.branches.provider.driver.volumes()
        assert sum(v.startswith(f"{branch}.") for v in volumes) == 1  # the old volume is gone
    finally:
        query(url(platform, "production"), "DROP TABLE after_fork")


def test_delete_refuses_children_unless_recursive(platform: Tierbase, branch: str) -> None:
    platform.create_branch(f"{branch}-kid", branch)
    platform.create_branch(f"{branch}-grandkid", f"{branch}-kid")
    platform.start_branch(f"{branch}-grandkid")
    with pytest.raises(Refused, match="has child branches") as exc:
        platform.delete_branch(branch)
    assert exc.value.exit_code == 2
    assert platform.store.find(f"{branch}-kid") is not None
    deleted = platform.delete_branch(branch, recursive=True)
    assert deleted == [f"{branch}-grandkid", f"{branch}-kid", branch]
    assert not any(v.split(".")[0].startswith(branch) for v in platform.branches.provider.driver.volumes())


def test_root_and_protected_cannot_be_deleted_or_reset(platform: Tierbase) -> None:
    with pytest.raises(Refused, match="protected tier"):
        platform.delete_branch("production")
    with pytest.raises(Refused):
        platform.reset_branch("production")
    assert platform.get_branch("production")["state"] == "ready"


@pytest.mark.parametrize("bad", ["../x", "a b", "'; drop", "x" * 64, "", "Upper", "-lead", "a.b", "é"])
def test_bad_names_are_refused_and_change_nothing(platform: Tierbase, bad: str) -> None:
    before = [b["name"] for b in platform.list_branches(with_bytes=False)]
    volumes = platform.branches.provider.driver.volumes()
    with pytest.raises(InvalidName, match="lowercase letters, digits and '-'"):
        platform.create_branch(bad)
    assert [b["name"] for b in platform.list_branches(with_bytes=False)] == before
    assert platform.branches.provider.driver.volumes() == volumes


def test_other_bad_inputs(platform: Tierbase, branch: str) -> None:
    with pytest.raises(BranchNotFound, match="does not exist"):
        platform.create_branch("orphan-x", "no-such-parent")
    with pytest.raises(InvalidInput, match="TTL 'soon' does not parse"):
        platform.create_branch("ttl-x", ttl="soon")
    with pytest.raises(BranchExists):
        platform.create_branch(branch)
    with pytest.raises(BranchNotFound):
        platform.delete_branch("never-was")
    assert platform.store.find("orphan-x") is None and platform.store.find("ttl-x") is None


def test_concurrent_creates_same_name_one_wins(platform: Tierbase) -> None:
    name = f"race-{secrets.token_hex(3)}"
    results: list[object] = []

    def attempt() -> None:
        tb = Tierbase(platform.home.root)  # separate facade, separate SQLite connections
        try:
            results.append(tb.create_branch(name)["name"])
        except BranchExists as err:
            results.append(err)
        finally:
            tb.close()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert results.count(name) == 1
        assert sum(isinstance(r, BranchExists) for r in results) == 3
    finally:
        platform.delete_branch(name)


def test_twenty_parallel_creates_of_different_names(platform: Tierbase) -> None:
    names = [f"par-{i}-{secrets.token_hex(2)}" for i in range(20)]
    errors: list[BaseException] = []

    def create(n: str) -> None:
        try:
            platform.create_branch(n)
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        ports = {platform.get_branch(n, with_bytes=False)["port"] for n in names}
        assert len(ports) == 20
    finally:
        for n in names:
            if platform.store.find(n):
                platform.delete_branch(n)


def test_ttl_expiry_sweeps_only_expired(platform: Tierbase) -> None:
    short, long_ = f"ttl-{secrets.token_hex(3)}", f"ttl-{secrets.token_hex(3)}"
    platform.create_branch(short, ttl="1m")
    platform.create_branch(long_, ttl="2h")
    try:
        info = platform.get_branch(short, with_bytes=False)
        assert info["ttl_seconds"] == 60
        import time

        gone = platform.sweep(now=time.time() + 120)
        assert short in gone and long_ not in gone
        assert platform.store.find(short) is None and platform.store.find(long_) is not None
    finally:
        for n in (short, long_):
            if platform.store.find(n):
                platform.delete_branch(n)


def test_own_bytes_grow_with_writes(platform: Tierbase, branch: str) -> None:
    before = platform.get_branch(branch)["own_bytes"]
    assert before < 1024 * 1024  # a fresh branch shares everything with its parent
    query(started(platform, branch), "CREATE TABLE big AS SELECT g, repeat('x', 200) AS pad "
                                     "FROM generate_series(1, 50000) g; CHECKPOINT")
    assert platform.get_branch(branch)["own_bytes"] > before + 5 * 1024 * 1024


def test_the_local_provider_refuses_a_fork_at_a_point_in_time_and_makes_nothing(platform: Tierbase) -> None:
    """Until point-in-time branches exist, `fork(at=...)` says so plainly instead of forking 'now'."""
    from tierbase.errors import NotSupported
    from tierbase.provider import ForkPoint

    p = platform.store.get("production")
    volumes = platform.provider.volumes()
    for at in (ForkPoint(lsn="0/16B3748"), ForkPoint(time=1_700_000_000.0)):
        with pytest.raises(NotSupported, match="is not supported by the 'btrfs' storage yet") as err:
            platform.provider.fork("production", p.volume, p.port, "pitr.00000000", at=at)
        assert err.value.http_status == 501 and "Branch it as of now" in err.value.hint
    assert platform.provider.volumes() == volumes
    assert platform.provider.health().driver == "btrfs" and platform.provider.health().compute_user == "postgres"
