"""Disk full is a branch's problem, not production's (issue 11, item 3).

A real `tierbase up` on a 1 GiB btrfs image (the service unprivileged, as in production): a feature
branch writes until it is stopped by the features' quota group, while a writer keeps committing on
production through the proxy; then `status`, `branch list` and `branch create` say so, and deleting
the hog gives the room back at once.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from .conftest import free_port, make_home, needs_root_btrfs
from .test_cli import as_json, leftovers, new_env, tierbase

pytestmark = needs_root_btrfs

MiB = 1024 ** 2
FEATURE_ROOM = 200 * MiB


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    home = make_home() / "home"
    e = new_env(home)
    try:
        as_json(e, "up", "--btrfs-size", "1G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        free = as_json(e, "status")["space"]["free"]
        # keep all but FEATURE_ROOM for tiers, so that the test fills the features' share quickly
        again = as_json(e, "up", "--space-reserve", f"{(free - FEATURE_ROOM) // MiB}M")
        assert any("feature branches may hold" in s for s in again["said"]), again
        yield e
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


class Writer(threading.Thread):
    """Commits one row at a time on production through the proxy and remembers what was acknowledged."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.acked, self.errors = url, [], []  # type: ignore[var-annotated]
        self.halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS w (id int PRIMARY KEY, at timestamptz DEFAULT now())")
            n = 0
            while not self.halt.is_set():
                n += 1
                try:
                    conn.execute("INSERT INTO w (id) VALUES (%s)", (n,))
                    self.acked.append((n, time.monotonic()))
                except psycopg.Error as err:
                    self.errors.append(str(err))
                    return
                time.sleep(0.02)


def fill(url: str) -> str:
    """Write into a branch until it refuses; the error's text (a session error or a refused connect)."""
    for _ in range(40):
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS big (id bigint, pad text)")
                while True:  # ~70 MB of heap and as much WAL per statement, never compressible
                    conn.execute("INSERT INTO big SELECT g, md5(random()::text) || md5(random()::text) "
                                 "FROM generate_series(1, 500000) g")
        except psycopg.Error as err:
            text = f"{getattr(err, 'sqlstate', '')} {err}"
            if "Disk quota exceeded" in text or "53100" in text or "out of disk space" in text:
                return text
            time.sleep(0.5)  # the compute crashed on the failed write (PANIC) and is being restarted
    raise AssertionError("the feature branch never ran out of room")


def test_a_feature_filling_its_share_fails_alone_while_production_commits(env: dict[str, str]) -> None:
    writer = Writer(as_json(env, "branch", "url", "production")["url"])
    writer.start()
    try:
        as_json(env, "branch", "create", "hog", "--start")
        hog = as_json(env, "branch", "url", "hog")["url"]
        said = fill(hog)
        failed_at = time.monotonic()
        # the branch stays out of room: once its crash recovery (if any) is over, a connection or a write
        # is refused with 53100 (the proxy, when the compute cannot start for want of room) or EDQUOT
        text = fill(hog)
        assert "53100" in text or "Disk quota exceeded" in text, text
        time.sleep(2)
        assert writer.errors == [], writer.errors
        assert writer.is_alive()
        after = [n for n, at in writer.acked if at > failed_at]
        assert len(after) > 20, f"production committed only {len(after)} rows after the hog failed ({said})"

        space = as_json(env, "status")["space"]
        assert space["isolation"] == "quota"
        assert space["features_used"] > space["features_limit"] - 64 * MiB
        assert "feature branches hold" in space["warning"]
        listed = tierbase(env, "branch", "list")
        assert "pool:" in listed.stdout and "Warning: feature branches hold" in listed.stderr

        refused = tierbase(env, "branch", "create", "another", "--json", check=False)
        assert refused.returncode == 1, refused.stderr
        assert "no room for a new branch" in refused.stderr and "MiB" in refused.stderr
        assert json.loads(refused.stdout)["error"]["code"] == "disk_full"
        assert "another" not in tierbase(env, "branch", "list", "--names").stdout.split()

        t0 = time.monotonic()
        assert as_json(env, "branch", "delete", "hog") == {"deleted": ["hog"]}
        as_json(env, "branch", "create", "another")  # the hog's space is back (pending frees waited for)
        assert time.monotonic() - t0 < 30
        assert as_json(env, "status")["space"]["warning"] is None
        as_json(env, "branch", "delete", "another")
    finally:
        writer.halt.set()
        writer.join(30)
    assert writer.errors == []
    rows = {r[0] for r in psycopg.connect(as_json(env, "branch", "url", "production")["url"]).execute(
        "SELECT id FROM w").fetchall()}
    assert {n for n, _ in writer.acked} <= rows  # every acknowledged commit kept


def test_create_below_the_reserve_is_refused_and_audited(env: dict[str, str]) -> None:
    status = as_json(env, "status")["space"]
    as_json(env, "up", "--space-reserve", f"{(status['free'] + 100 * MiB) // MiB}M")
    try:
        got = tierbase(env, "branch", "create", "late", check=False)
        assert got.returncode == 1 and "below the reserve" in got.stderr, got.stderr
        assert "free" in got.stderr and "Delete branches" in got.stderr
        rows = as_json(env, "audit", "log", "--action", "branch.create")  # target: the parent branched
        assert any(str(r["outcome"]).startswith("error") and "below the reserve" in str(r["outcome"])
                   for r in rows), rows
        # tiers are not held by the reserve: the platform's own operations on them still work
        assert as_json(env, "branch", "start", "production")["compute"] == "running"
    finally:
        as_json(env, "up", "--space-reserve", f"{(status['free'] - FEATURE_ROOM) // MiB}M")
    as_json(env, "branch", "create", "late")
    as_json(env, "branch", "delete", "late")


def test_space_needs_a_principal(env: dict[str, str]) -> None:
    api = _api(Path(env["TIERBASE_HOME"]))
    assert httpx.get(f"{api}/v1/space", timeout=10).status_code == 401
    bad = httpx.get(f"{api}/v1/space", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
    ok = httpx.get(f"{api}/v1/space", headers={"Authorization": f"Bearer {env['TIERBASE_TOKEN']}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["free"] > 0


def _api(home: Path) -> str:
    info: dict[str, Any] = json.loads((home / "service.json").read_text())
    return str(info["api_url"])
