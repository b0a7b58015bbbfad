"""Clean shutdown (issue 11): `down` ends every proxied session with FATAL 57P01, stops the computes
with a fast shutdown and leaves nothing running; a second `down` is a no-op."""

from __future__ import annotations

import shutil
import threading

import psycopg
import pytest

from .conftest import free_port, make_home, needs_root_btrfs
from .test_cli import as_json, leftovers, new_env, postgres_pids, tierbase

pytestmark = needs_root_btrfs


def test_down_says_57p01_to_live_sessions_and_leaves_nothing() -> None:
    home = make_home() / "home"
    env = new_env(home)
    try:
        as_json(env, "up", "--btrfs-size", "1G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        env["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        url = as_json(env, "branch", "url", "production")["url"] + "?sslmode=disable"
        idle = psycopg.connect(url, autocommit=True)
        busy = psycopg.connect(url, autocommit=True)
        assert idle.execute("SELECT 1").fetchone() == (1,)
        errors: list[BaseException] = []

        def long_query() -> None:
            try:
                busy.execute("SELECT pg_sleep(60)")
            except psycopg.Error as err:
                errors.append(err)

        t = threading.Thread(target=long_query)
        t.start()
        tierbase(env, "down")
        t.join(30)
        assert not t.is_alive(), "a query in flight outlived `down`"
        with pytest.raises(psycopg.OperationalError) as idle_err:
            idle.execute("SELECT 1")
        for err in [idle_err.value, *errors]:
            assert "shutting down" in str(err) or "57P01" in str(getattr(err, "sqlstate", "")), err
        assert postgres_pids(home) == []
        again = tierbase(env, "down")  # nothing left to stop: fine, and says so
        assert again.returncode == 0 and "nothing was running" in again.stdout
        idle.close()
        busy.close()
    finally:
        tierbase(env, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)
