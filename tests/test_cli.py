"""The CLI and HTTP API as a user meets them: `tierbase up`, commands with --json, exit codes, `down --purge`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from .conftest import ROOT, free_port, free_port_base, make_home, needs_root_btrfs, query

pytestmark = needs_root_btrfs


def tierbase(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    got = subprocess.run([sys.executable, "-m", "tierbase.cli.main", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    if check and got.returncode != 0:
        raise AssertionError(f"tierbase {' '.join(args)} exited {got.returncode}: {got.stderr}")
    return got


def as_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(tierbase(env, *args, "--json").stdout)


def postgres_pids(home: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(home) in cmd and "postgres" in cmd:
                pids.append(int(proc.name))
    return pids


def leftovers(home: Path) -> list[str]:
    found = []
    if any(str(home) in line for line in Path("/proc/self/mounts").read_text().splitlines()):
        found.append("mount")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    if str(home) in loops:
        found.append("loop device")
    if postgres_pids(home):
        found.append("postgres process")
    return found


def new_env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, TIERBASE_HOME=str(home), TIERBASE_PORT_BASE=str(free_port_base()), **extra)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    home = make_home() / "home"
    e = new_env(home, TIERBASE_SWEEP_INTERVAL="1")
    try:
        up = as_json(e, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        assert up["driver"] == "btrfs" and up["copy_on_write"] is True
        assert any("loop-mounted" in s for s in up["said"])
        # act as the owner by token, as a script would: without one, every command says so on stderr
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        yield e
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def test_up_again_is_idempotent_and_status_reports(env: dict[str, str]) -> None:
    again = as_json(env, "up")
    assert any("already running" in s for s in again["said"])
    status = as_json(env, "status")
    assert status["running"] is True and status["driver"] == "btrfs" and status["branches"] >= 1


def test_branch_lifecycle_through_the_cli(env: dict[str, str]) -> None:
    created = as_json(env, "branch", "create", "cli-a", "--ttl", "7d", "--start")
    assert created["driver"] == "btrfs" and created["compute"] == "running" and created["ttl_seconds"] == 7 * 86400
    url = as_json(env, "branch", "url", "cli-a")["url"]
    assert url.startswith("postgresql://") and url.endswith("/cli-a")
    direct = tierbase(env, "branch", "url", "cli-a", "--direct").stdout.strip()
    assert query(direct, "SELECT 1") == [(1,)]
    names = [b["name"] for b in as_json(env, "branch", "list")]
    assert names[:1] == ["production"] and "cli-a" in names
    text = tierbase(env, "branch", "list").stdout
    assert "└─ cli-a" in text and "production [protected]" in text
    shown = as_json(env, "branch", "show", "cli-a")
    assert shown["parent"] == "production" and shown["own_bytes"] is not None
    assert as_json(env, "branch", "stop", "cli-a")["compute"] == "stopped"
    assert as_json(env, "branch", "reset", "cli-a")["name"] == "cli-a"
    assert as_json(env, "branch", "delete", "cli-a") == {"deleted": ["cli-a"]}


@pytest.mark.parametrize(("args", "code", "says"), [
    (("branch", "create", "../x"), 1, "lowercase letters, digits and '-'"),
    (("branch", "create", "a b"), 1, "lowercase letters"),
    (("branch", "create", "x" * 64), 1, "1-63 characters"),
    (("branch", "create", "ok-name", "--parent", "nope"), 1, "'nope' does not exist"),
    (("branch", "create", "ok-name", "--ttl", "forever"), 1, "does not parse"),
    (("branch", "delete", "production"), 2, "cannot be deleted"),
    (("branch", "reset", "production"), 2, "production"),
    (("branch", "show", "ghost"), 1, "does not exist"),
    # a name is one path segment of the API, whatever it holds: never another endpoint, query or branch
    (("branch", "delete", "../../v1/principals"), 1, "no API endpoint DELETE /v1/branches/../../v1/principals"),
    (("branch", "delete", ".."), 1, "lowercase letters"),
    (("branch", "delete", "production?recursive=true"), 1, "lowercase letters"),
    (("branch", "show", "production#x"), 1, "lowercase letters"),
    (("branch", "reset", "production%2F"), 1, "lowercase letters"),
])
def test_bad_input_exit_codes_and_messages(env: dict[str, str], args: tuple[str, ...], code: int,
                                           says: str) -> None:
    def snapshot() -> list[tuple[Any, ...]]:
        return [(b["name"], b["parent"], b["state"], b["port"], b["created_at"])
                for b in as_json(env, "branch", "list", "--no-bytes")]

    before = snapshot()
    got = tierbase(env, *args, check=False)
    assert got.returncode == code
    assert got.stderr.startswith("Error: ") and says in got.stderr
    as_js = tierbase(env, *args, "--json", check=False)
    assert as_js.returncode == code and json.loads(as_js.stdout)["error"]["message"]
    assert snapshot() == before


def test_parallel_cli_creates(env: dict[str, str]) -> None:
    names = [f"par-{i}" for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda n: tierbase(env, "branch", "create", n, check=False), names))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    with ThreadPoolExecutor(2) as pool:
        twins = list(pool.map(lambda _: tierbase(env, "branch", "create", "twin", check=False), range(2)))
    assert sorted(r.returncode for r in twins) == [0, 1]
    assert "already exists" in next(r.stderr for r in twins if r.returncode)
    for n in [*names, "twin"]:
        tierbase(env, "branch", "delete", n)


def test_ttl_expiry_by_the_service(env: dict[str, str]) -> None:
    as_json(env, "branch", "create", "short-lived", "--ttl", "2s")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "short-lived" not in [b["name"] for b in as_json(env, "branch", "list", "--no-bytes")]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the branch with a 2s TTL was not deleted by the service within 30s")


def test_api_openapi_and_auth(env: dict[str, str]) -> None:
    home = Path(env["TIERBASE_HOME"])
    info = json.loads((home / "service.json").read_text())
    doc = httpx.get(f"{info['api_url']}/openapi.json").json()
    assert "/v1/branches" in doc["paths"]
    denied = httpx.get(f"{info['api_url']}/v1/branches", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    missing = httpx.get(f"{info['api_url']}/v1/branches")
    assert missing.status_code == 401
    token = (home / "api.token").read_text().strip()
    bad = httpx.post(f"{info['api_url']}/v1/branches", json={"nam": "x"},
                     headers={"Authorization": f"Bearer {token}"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"


def test_openapi_describes_every_response_and_the_error_envelope(env: dict[str, str]) -> None:
    info = json.loads((Path(env["TIERBASE_HOME"]) / "service.json").read_text())
    doc = httpx.get(f"{info['api_url']}/openapi.json").json()
    missing = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            if not ok or not all(r.get("content", {}).get("application/json", {}).get("schema") for r in ok.values()):
                missing.append(f"{method.upper()} {path}: no success schema")
            for code in ("401", "404", "422", "500"):
                schema = op["responses"].get(code, {}).get("content", {}).get("application/json", {}).get("schema")
                if schema != {"$ref": "#/components/schemas/ErrorEnvelope"}:
                    missing.append(f"{method.upper()} {path}: {code} is not the error envelope")
    assert missing == []
    schemas = doc["components"]["schemas"]
    for model, field in (("Branch", "copy_on_write"), ("Route", "movable"), ("Principal", "role"),
                         ("PrincipalCreated", "token"), ("AuditRecord", "hash"), ("ErrorBody", "hint")):
        assert field in schemas[model]["properties"], model
    listed = doc["paths"]["/v1/branches"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["items"] == {"$ref": "#/components/schemas/Branch"}
    # typed answers keep every field the facade gave, and add none it did not
    made = as_json(env, "branch", "create", "typed-x")
    assert {"elapsed_ms", "driver", "copy_on_write", "fork_lsn"} <= set(made) and "sessions" not in made
    listed_x = next(b for b in as_json(env, "branch", "list", "--no-bytes") if b["name"] == "typed-x")
    assert "own_bytes" not in listed_x and "elapsed_ms" not in listed_x
    tierbase(env, "branch", "delete", "typed-x")


def test_commands_without_a_running_platform_say_so() -> None:
    home = make_home() / "nothing-here"
    try:
        got = tierbase(new_env(home), "branch", "list", check=False)
        assert got.returncode == 1 and "not running" in got.stderr and "tierbase up" in got.stderr
        # by URL: nothing listens there (the light transport's connection error is the same clear error)
        dead = f"http://127.0.0.1:{free_port()}"
        got = tierbase(new_env(home, TIERBASE_TOKEN="t"), "--api", dead, "branch", "create", "x", check=False)
        assert got.returncode == 1 and f"the tierbase service at {dead} does not answer" in got.stderr
        assert "tierbase status" in got.stderr
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)


def test_missing_postgres_binaries_is_a_clear_error_and_makes_nothing() -> None:
    home = make_home() / "home"
    try:
        got = tierbase(new_env(home, TIERBASE_PG_BINDIR="/nonexistent/bin"), "up", check=False)
        assert got.returncode == 1
        assert "binaries" in got.stderr and "apt-get install postgresql" in got.stderr
        assert not home.exists()
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="mounting a tiny tmpfs to fill needs root")
def test_full_disk_is_a_clear_error_and_leaves_nothing() -> None:
    base = make_home()
    home = base / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(home)], check=True)
    try:
        got = tierbase(new_env(home), "up", "--storage", "copy", check=False)
        assert got.returncode == 1, got.stderr
        assert "no space left" in got.stderr
        assert list(home.iterdir()) == []  # nothing half-made
        assert postgres_pids(home) == []
    finally:
        subprocess.run(["umount", str(home)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_copy_driver_says_it_copies(tmp_path: Path) -> None:
    home = make_home() / "home"
    e = new_env(home)
    try:
        up = as_json(e, "up", "--storage", "copy", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        assert up["driver"] == "copy" and up["copy_on_write"] is False
        assert any("O(size)" in s for s in up["said"])
        tierbase(e, "branch", "start", "production")
        query(tierbase(e, "branch", "url", "production", "--direct").stdout.strip(),
              "CREATE TABLE t AS SELECT 42 AS x")
        made = as_json(e, "branch", "create", "copied", "--start")
        assert made["driver"] == "copy" and made["copy_on_write"] is False
        url = tierbase(e, "branch", "url", "copied", "--direct").stdout.strip()
        assert query(url, "SELECT x FROM t") == [(42,)]
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)




def test_governance_commands(env: dict[str, str]) -> None:
    made = as_json(env, "principal", "create", "ada", "--role", "developer")
    assert made["token"].startswith("tbt_") and made["role"] == "developer"
    ada = dict(env, TIERBASE_TOKEN=made["token"])
    assert as_json(ada, "branch", "create", "ada-work")["creator"] == "ada"
    denied = tierbase(ada, "policy", "reload", check=False)
    assert denied.returncode == 2 and "policy.reload" in denied.stderr
    explain = as_json(env, "policy", "explain", "--as", "ada", "branch.delete", "ada-work")
    assert explain["allowed"] is True and explain["rule"] == "owner"
    assert "DENIED" in tierbase(env, "policy", "explain", "--as", "ada", "route.set", "production").stdout
    log = tierbase(env, "audit", "log", "--actor", "ada", "--jsonl").stdout.splitlines()
    records = [json.loads(line) for line in log]
    # a change is audited twice: its intent before the act (crash-safe), its outcome after
    assert [(r["action"], r["outcome"]) for r in records] == \
        [("branch.create", "intent"), ("branch.create", "ok"), ("policy.reload", "refused")]
    assert records[-1]["decision"] == "denied"
    assert as_json(env, "audit", "verify")["ok"] is True
    as_json(env, "principal", "revoke", "ada")
    gone = tierbase(ada, "branch", "list", check=False)
    assert gone.returncode == 1 and "revoked" in gone.stderr
    assert "(sha256" in tierbase(env, "policy", "show").stdout
    tierbase(env, "branch", "delete", "ada-work")


def test_idle_computes_are_suspended_and_wake_on_connect() -> None:
    home = make_home() / "home"
    e = new_env(home)
    try:
        as_json(e, "up", "--btrfs-size", "1G", "--idle-timeout", "2", "--api-port", str(free_port()),
                "--proxy-port", str(free_port()))
        url = as_json(e, "branch", "url", "production")["url"]
        assert as_json(e, "branch", "show", "production")["compute"] == "stopped"
        with psycopg.connect(url, autocommit=True) as conn:  # wakes it through the proxy
            assert conn.execute("SELECT 1").fetchone() == (1,)
            time.sleep(4)  # longer than the idle timeout: a session is open, so it stays up
            assert as_json(e, "branch", "show", "production")["compute"] == "running"
            assert conn.execute("SELECT 2").fetchone() == (2,)
        deadline = time.monotonic() + 30
        while as_json(e, "branch", "show", "production")["compute"] == "running":
            assert time.monotonic() < deadline, "the idle compute was not suspended"
            time.sleep(0.5)
        assert postgres_pids(home) == []  # a suspended branch uses no process
        assert query(url, "SELECT 3") == [(3,)]  # and wakes again on the next connection
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def test_route_set_repoints_live_sessions(env: dict[str, str]) -> None:
    for name in ("blue", "green"):
        as_json(env, "branch", "create", name, "--start")
        direct = tierbase(env, "branch", "url", name, "--direct").stdout.strip()
        query(direct, "CREATE TABLE color AS SELECT %s::text AS c", name)
    assert as_json(env, "route", "set", "live", "blue")["previous"] is None
    url = as_json(env, "branch", "url", "live")["url"]
    assert url.endswith("/live")
    with psycopg.connect(url, autocommit=True) as old:
        assert old.execute("SELECT c FROM color").fetchone() == ("blue",)
        moved = as_json(env, "route", "set", "live", "green")
        assert moved["previous"] == "blue" and moved["sessions_ended"] == 1
        with pytest.raises(psycopg.errors.AdminShutdown, match='now points to branch "green"'):
            old.execute("SELECT c FROM color")
    assert query(url, "SELECT c FROM color") == [("green",)]
    refused = tierbase(env, "branch", "delete", "green", check=False)
    assert refused.returncode == 2 and "route 'live' points at branch 'green'" in refused.stderr
    as_json(env, "route", "set", "live", "blue")
    tierbase(env, "branch", "delete", "green")


def fresh_app_repo(path: Path) -> Path:
    """A new app's git repo: one commit on main, no tierbase files yet."""
    path.mkdir(parents=True)
    (path / "app.py").write_text("print('hello')\n")
    for args in (("init", "--quiet", "-b", "main"), ("config", "user.email", "dev@example.com"),
                 ("config", "user.name", "Dev"), ("add", "-A"), ("commit", "--quiet", "-m", "app")):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


@contextmanager
def fresh_platform() -> Iterator[dict[str, str]]:
    """A platform of its own, as `tierbase up` leaves it (no config loaded), acting as its owner by token."""
    home = make_home() / "home"
    e = new_env(home)
    try:
        as_json(e, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()  # the owner: a platform engineer
        yield e
    finally:
        tierbase(e, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def test_init_by_a_platform_engineer_on_a_fresh_platform_is_one_step(tmp_path: Path) -> None:
    with fresh_platform() as e:
        repo = fresh_app_repo(tmp_path / "shop")
        done = as_json(e, "init", "--repo", str(repo))
        assert done["state"] == "scaffold-complete" and "pending" not in done
        assert any("created tier 'staging'" in s for s in done["said"])
        assert any("committed the scaffold" in s for s in done["said"])
        assert as_json(e, "branch", "show", "staging")["kind"] == "tier"
        assert as_json(e, "policy", "show")["source"] == str(repo / "tierbase.toml")
        assert json.loads((repo / ".tierbase" / "workflow-state.json").read_text())["state"] == "scaffold-complete"


def test_init_by_anyone_else_writes_the_files_and_names_the_command_to_ask_for(tmp_path: Path) -> None:
    with fresh_platform() as e:
        dev = dict(e, TIERBASE_TOKEN=as_json(e, "principal", "create", "dev", "--role", "developer")["token"])
        before = as_json(e, "policy", "show")
        repo = fresh_app_repo(tmp_path / "shop")
        got = tierbase(dev, "init", "--repo", str(repo))
        command = f"tierbase policy reload --file {repo / 'tierbase.toml'}"
        assert command in got.stdout and "platform engineer" in got.stdout and "tierbase init" in got.stdout
        assert (repo / "tierbase.toml").is_file() and (repo / "db" / "migrations").is_dir()
        as_js = json.loads(tierbase(dev, "init", "--repo", str(repo), "--json").stdout)
        assert as_js["pending"] == {"who": "platform-engineer", "command": command, "then": "tierbase init"}
        assert as_js["state"] is None
        # nothing changed on the platform: no tier, the same config, no workspace; the refusal is audited
        assert "staging" not in [b["name"] for b in as_json(e, "branch", "list", "--no-bytes")]
        assert as_json(e, "policy", "show")["sha256"] == before["sha256"]
        assert not (repo / ".tierbase" / "workflow-state.json").exists()
        denied = as_json(e, "audit", "log", "--action", "policy.reload")
        assert denied and all(r["actor"] == "dev" and r["decision"] == "denied" for r in denied)
        # the platform engineer runs the command named, verbatim; the developer's next init finishes
        tierbase(e, *shlex.split(command)[1:])
        again = as_json(dev, "init", "--repo", str(repo))
        assert again["state"] == "scaffold-complete" and any("committed the scaffold" in s for s in again["said"])
