"""kill -9 at each step of create/delete/reset, then reconcile: nothing half-made survives."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import pytest

from tierbase import Tierbase

from .conftest import query


def die_at(tb: Tierbase, failpoint: str, code: str) -> None:
    """Run ``code`` with facade ``tb`` in a child process that SIGKILLs itself at ``failpoint``."""
    script = f"from tierbase import Tierbase\ntb = Tierbase({str(tb.home.root)!r})\n{code}\n"
    env = dict(os.environ, TIERBASE_FAILPOINTS=failpoint)
    got = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == -signal.SIGKILL, got.stderr


def volumes_of(tb: Tierbase, name: str) -> list[str]:
    return [v for v in tb.branches.provider.driver.volumes() if v.split(".")[0] == name]


@pytest.mark.parametrize("point", ["create:reserved", "create:cloned"])
def test_crash_during_create_is_undone(platform: Tierbase, point: str) -> None:
    name = f"crash-{secrets.token_hex(3)}"
    die_at(platform, point, f"tb.create_branch({name!r})")
    half = platform.store.find(name)
    assert half is not None and half.state.value == "creating"
    done = platform.reconcile()
    assert any(name in line for line in done)
    assert platform.store.find(name) is None
    assert volumes_of(platform, name) == []
    # and the name is usable again
    platform.create_branch(name)
    platform.delete_branch(name)


@pytest.mark.parametrize("point", ["delete:marked", "delete:volume-gone"])
def test_crash_during_delete_is_finished(platform: Tierbase, point: str) -> None:
    name = f"crash-{secrets.token_hex(3)}"
    platform.create_branch(name)
    platform.create_branch(f"{name}-kid", name)
    platform.start_branch(f"{name}-kid")
    die_at(platform, point, f"tb.delete_branch({name!r}, recursive=True)")
    assert platform.store.find(name) is not None  # left 'deleting'
    platform.reconcile()
    for n in (name, f"{name}-kid"):
        assert platform.store.find(n) is None
        assert volumes_of(platform, n) == []


@pytest.mark.parametrize("point", ["reset:cloned", "reset:swapped"])
def test_crash_during_reset_leaves_one_working_volume(platform: Tierbase, branch: str, point: str) -> None:
    platform.start_branch(branch)
    query(platform.branch_url(branch, direct=True), "DELETE FROM seed")
    die_at(platform, point, f"tb.reset_branch({branch!r})")
    assert len(volumes_of(platform, branch)) == 2  # old and new both on disk
    platform.reconcile()
    assert len(volumes_of(platform, branch)) == 1
    platform.start_branch(branch)
    rows = query(platform.branch_url(branch, direct=True), "SELECT count(*) FROM seed")
    # before the swap the reset never happened; after it, it did: either way a consistent branch
    assert rows == ([(0,)] if point == "reset:cloned" else [(1000,)])


def test_stale_pid_file_does_not_count_as_running(platform: Tierbase, branch: str) -> None:
    platform.start_branch(branch)
    volume = platform.store.get(branch).volume
    datadir = platform.branches.provider.datadir(volume)
    pid = platform.branches.provider.running_pid(volume)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the postmaster dies; its lock file stays
    import time

    deadline = time.monotonic() + 10
    while platform.branches.provider.running_pid(volume) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (datadir / "postmaster.pid").exists()
    assert platform.get_branch(branch, with_bytes=False)["compute"] == "stopped"
    # orphaned backends may linger a moment after the postmaster's SIGKILL; start must still work
    platform.start_branch(branch)
    assert query(platform.branch_url(branch, direct=True), "SELECT count(*) FROM seed") == [(1000,)]


def test_reconcile_removes_orphan_volumes(platform: Tierbase) -> None:
    driver = platform.branches.provider.driver
    driver.create("stray.deadbeef")
    assert "removed orphan volume 'stray.deadbeef'" in platform.reconcile()
    assert "stray.deadbeef" not in driver.volumes()
