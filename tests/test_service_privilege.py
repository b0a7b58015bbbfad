"""Least privilege: root only mounts; the service runs as the compute user; other OS users come by URL + token.

Everything here goes through a real `tierbase up` as root (btrfs loop mount, real postgres, the real
service process) and real OS users: the service's uid is read from /proc, files from the disk, and an
agent runs the CLI under a throwaway OS user of its own.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tierbase
from tierbase.compute import compute_user
from tierbase.compute.ports import COMPUTE_PORTS, check_base, check_port, default_ports, ephemeral_range
from tierbase.errors import InvalidInput
from tierbase.launch import service_python

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs, teardown_platform
from .test_cli import as_json, leftovers, new_env
from .test_cli import tierbase as run_cli

pytestmark = needs_root_btrfs

SOURCE = str(Path(tierbase.__file__).resolve().parents[1])
NO_TOKEN = "TIERBASE_TOKEN"


@dataclass
class Platform:
    env: dict[str, str]  # root's, without a token: the OS owner
    home: Path
    api: str
    pid: int


@pytest.fixture(scope="module")
def plat() -> Iterator[Platform]:
    home = make_home() / "home"
    env = new_env(home)
    env.pop(NO_TOKEN, None)
    try:
        up = as_json(env, "up", "--btrfs-size", "1G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        info = json.loads((home / "service.json").read_text())
        yield Platform(env=env, home=home, api=up["api_url"], pid=int(info["pid"]))
    finally:
        run_cli(env, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


@dataclass
class OsUser:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def agent_user() -> Iterator[OsUser]:
    """A throwaway OS user for the agent, removed afterwards."""
    name = f"tb-agent-{secrets.token_hex(3)}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create an OS user for the agent: {made.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        yield OsUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def cli_as(user: OsUser, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as another OS user: its own (empty) environment, an interpreter it can run."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "PYTHONPATH": SOURCE}
    return subprocess.run([service_python(), "-m", "tierbase.cli.main", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=120, cwd="/", user=user.uid, group=user.gid,
                          extra_groups=[])


def as_user(name: str) -> OsUser:
    entry = pwd.getpwnam(name)
    return OsUser(name, entry.pw_uid, entry.pw_gid)


def branch_names(plat: Platform) -> list[str]:
    env = dict(plat.env, TIERBASE_TOKEN=(plat.home / "api.token").read_text().strip())
    return [b["name"] for b in as_json(env, "branch", "list", "--no-bytes")]


def status_ids(pid: int) -> dict[str, list[int]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: [int(x) for x in v.split()] for k, v in (ln.split(":", 1) for ln in lines) if k in ("Uid", "Gid")}


# -- the service and its computes are not root ---------------------------------------------------
def test_the_service_runs_as_the_compute_user(plat: Platform) -> None:
    user = compute_user()
    assert user.uid != 0
    ids = status_ids(plat.pid)
    assert ids["Uid"] == [user.uid] * 4, ids  # real, effective, saved and filesystem uid
    assert ids["Gid"] == [user.gid] * 4, ids
    groups = Path(f"/proc/{plat.pid}/status").read_text().split("Groups:", 1)[1].splitlines()[0].split()
    assert "0" not in groups  # no supplementary root group either
    started = as_json(plat.env, "branch", "start", "production")  # the unprivileged service starts it
    assert status_ids(int(started["pid"]))["Uid"][0] == user.uid
    as_json(plat.env, "branch", "create", "made-by-service")  # snapshot as non-root ...
    as_json(plat.env, "branch", "create", "snap-by-service", "--snapshot", "--parent", "made-by-service")
    shown = as_json(plat.env, "branch", "show", "made-by-service")
    assert shown["own_bytes"] is not None  # btrfs filesystem du works without root
    # ... and delete (a read-only snapshot too) without root: user_subvol_rm_allowed
    assert as_json(plat.env, "branch", "delete", "made-by-service", "--recursive")["deleted"] == [
        "snap-by-service", "made-by-service"]
    assert not any(n.endswith("by-service") for n in os.listdir(plat.home / "volumes"))


def test_nothing_in_the_data_dir_is_readable_by_others(plat: Platform) -> None:
    as_json(plat.env, "branch", "start", "production")  # so that a compute log exists
    user = compute_user()
    seen: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(plat.home):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                seen[str(path.relative_to(plat.home))] = (stat.S_IMODE(st.st_mode), st.st_uid)
    home = plat.home.stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o700, user.uid)
    for must in ("meta.db", "btrfs.img", "api.token", "audit.key", "service.log", "service.json", "logs",
                 "logs/production.log", "volumes", "sockets"):
        assert must in seen, f"{must} is missing from the data dir"
    # certificates are public by design (and out of reach in the 0700 data dir); their keys are not
    loose = {p: oct(mode) for p, (mode, _) in seen.items() if mode & 0o077 and not p.endswith(".crt")}
    assert loose == {}, f"readable or writable by others: {loose}"
    assert all(mode & 0o022 == 0 for p, (mode, _) in seen.items()), "writable by others"
    # root keeps only the image (a mounted filesystem's) and the owner's token; the rest is the service's
    foreign = {p for p, (_, uid) in seen.items() if uid != user.uid}
    assert foreign == {"btrfs.img", "api.token"}, foreign


# -- clients under other OS users ---------------------------------------------------------------------
def test_an_agent_under_its_own_os_user_works_by_url_and_token(plat: Platform, agent_user: OsUser) -> None:
    token = as_json(plat.env, "principal", "create", "remote-agent", "--role", "developer")["token"]
    made = cli_as(agent_user, "--api", plat.api, "branch", "create", "agent-work", "--json", TIERBASE_TOKEN=token)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["creator"] == "remote-agent"
    listed = cli_as(agent_user, "branch", "list", "--json", TIERBASE_API=plat.api, TIERBASE_TOKEN=token)
    assert listed.returncode == 0, listed.stderr
    assert "agent-work" in [b["name"] for b in json.loads(listed.stdout)]
    assert "acting as" not in made.stderr + listed.stderr
    as_json(plat.env, "branch", "delete", "agent-work")


@pytest.mark.parametrize("token_env", [{}, {"TIERBASE_TOKEN": ""}, {"TIERBASE_TOKEN": "   "}],
                         ids=["unset", "empty", "blank"])
def test_an_agent_without_a_token_is_refused(plat: Platform, agent_user: OsUser, token_env: dict[str, str]) -> None:
    before = branch_names(plat)
    got = cli_as(agent_user, "--api", plat.api, "branch", "create", "no-token-work", **token_env)
    assert got.returncode == 1, got.stderr
    assert got.stderr.startswith("Error: no TIERBASE_TOKEN is set") and "TIERBASE_TOKEN to your token" in got.stderr
    assert "acting as" not in got.stderr
    # pointed at the real data dir it may not read, it is refused the same way, not promoted
    there = cli_as(agent_user, "--api", plat.api, "branch", "list", TIERBASE_HOME=str(plat.home), **token_env)
    assert there.returncode == 1 and "is not the owner of the data dir" in there.stderr, there.stderr
    assert branch_names(plat) == before


def test_an_agent_cannot_read_the_data_dir_and_is_told_to_use_the_api(plat: Platform, agent_user: OsUser) -> None:
    got = cli_as(agent_user, "branch", "list", TIERBASE_HOME=str(plat.home), TIERBASE_TOKEN="tbt_whatever")
    assert got.returncode == 1
    assert f"cannot read the data dir {plat.home}" in got.stderr and "TIERBASE_API" in got.stderr
    for name in ("meta.db", "api.token", "audit.key", "btrfs.img"):
        probe = subprocess.run(["cat", str(plat.home / name)], capture_output=True, user=agent_user.uid,
                               group=agent_user.gid, extra_groups=[])
        assert probe.returncode != 0 and probe.stdout == b""


def test_the_service_user_is_not_the_owner(plat: Platform) -> None:
    """The service's own OS user can read the data dir, yet is no principal: without a token it is refused."""
    before = branch_names(plat)
    got = cli_as(as_user(compute_user().name), "branch", "create", "svc-user-work", TIERBASE_HOME=str(plat.home))
    assert got.returncode == 1 and "is not the owner of the data dir" in got.stderr, got.stderr
    assert branch_names(plat) == before


def test_the_os_owner_without_a_token_acts_as_owner_and_is_told_once(plat: Platform) -> None:
    for i, env in enumerate((plat.env, dict(plat.env, TIERBASE_TOKEN=""))):
        got = run_cli(env, "branch", "create", f"owner-work-{i}", "--json")
        assert json.loads(got.stdout)["creator"] == "root"
        assert got.stderr.count("acting as root, the data dir's owner: no TIERBASE_TOKEN") == 1, got.stderr
    with_token = dict(plat.env, TIERBASE_TOKEN=(plat.home / "api.token").read_text().strip())
    assert "acting as" not in run_cli(with_token, "branch", "delete", "owner-work-0", "--json").stderr
    run_cli(with_token, "branch", "delete", "owner-work-1")


def test_an_empty_bearer_token_is_no_credential(plat: Platform) -> None:
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(plat.api)
    for header in ("Bearer ", "Bearer", "Bearer \t", None):
        conn = http.client.HTTPConnection(str(where.hostname), where.port, timeout=10)  # sends "Bearer " as is
        conn.request("GET", "/v1/branches", headers={"Authorization": header} if header is not None else {})
        got = conn.getresponse()
        assert got.status == 401 and json.loads(got.read())["error"]["code"] == "unauthorized", header
        conn.close()


# -- ports ---------------------------------------------------------------------------------------------
def test_default_ports_lie_below_the_ephemeral_range() -> None:
    lo, hi = ephemeral_range()
    d = default_ports()
    for port in (d.api, d.proxy, d.base, d.base + COMPUTE_PORTS - 1):
        assert not lo <= port <= hi and 1024 <= port <= 65535
    assert d.api < lo  # below, on this machine's range (32768-60999 by default)
    wide = default_ports((20000, 60999))  # a range widened over the preferred block moves the defaults
    assert wide.base + COMPUTE_PORTS - 1 < 20000 and wide.api >= 1024
    with pytest.raises(InvalidInput, match="ephemeral port range 32768-60999"):
        check_port(55430, "the API port", "--api-port 25430", (32768, 60999))
    with pytest.raises(InvalidInput, match="reach into the kernel's ephemeral port range"):
        check_base(31000, (32768, 60999))
    assert check_base(61000, (32768, 60999)) == 61000  # above the range is fine too


@pytest.mark.parametrize(("args", "extra", "says"), [
    (("--api-port", "45000"), {}, "the API port 45000 lies in the kernel's ephemeral port range"),
    (("--proxy-port", "33000"), {}, "the proxy port 33000 lies in the kernel's ephemeral port range"),
    (("--api-port", "80"), {}, "is not a port tierbase may listen on"),
    ((), {"TIERBASE_PORT_BASE": "55432"}, "TIERBASE_PORT_BASE"),
])
def test_up_refuses_ports_in_the_ephemeral_range(args: tuple[str, ...], extra: dict[str, str], says: str) -> None:
    if ephemeral_range() != (32768, 60999):
        pytest.skip("the ports in this test assume Linux's default ephemeral range")
    home = make_home() / "home"
    try:
        env = {**new_env(home), **extra}
        got = run_cli(env, "up", "--btrfs-size", "1G", *args, check=False)
        assert got.returncode == 1 and got.stderr.startswith("Error: ") and says in got.stderr, got.stderr
        assert "Choose" in got.stderr
        assert not home.exists()  # refused before anything was made
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)


def test_a_compute_port_held_by_another_process_moves_and_is_recorded(plat: Platform) -> None:
    """Issue 11: a compute that cannot bind its port gets another one, below the ephemeral range, audited."""
    b = as_json(plat.env, "branch", "create", "port-held")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", int(b["port"])))
        holder.listen()
        shown = as_json(plat.env, "branch", "start", "port-held")
        assert shown["compute"] == "running" and shown["port"] != b["port"]
        low, _high = ephemeral_range()
        assert int(shown["port"]) < low
    moved = [r for r in as_json(plat.env, "audit", "log", "--action", "compute.port") if r["target"] == "port-held"]
    assert moved and str(b["port"]) in moved[-1]["reason"]
    as_json(plat.env, "branch", "delete", "port-held")


def test_an_older_data_dir_gets_compute_ports_below_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """A data dir made when ports lay in the ephemeral range: new computes move below it, and up says so."""
    if ephemeral_range() != (32768, 60999):
        pytest.skip("the ports in this test assume Linux's default ephemeral range")
    from tierbase import Tierbase

    home = make_home() / "home"
    monkeypatch.setenv("TIERBASE_PORT_BASE", str(free_port_base()))
    tb = Tierbase(home)
    try:
        tb.init(storage="copy", api_port=free_port(), proxy_port=free_port())
        tb.store.set_setting("port_base", 55432)  # as an earlier tierbase chose
        tb.store.set_setting("api_port", 55430)
        tb.close()
        said = Tierbase(home).init()
        assert any("new computes get ports from 25432 (existing ones keep theirs)" in s for s in said), said
        assert any("the API port 55430 lies in the kernel's ephemeral port range" in s for s in said), said
        again = Tierbase(home)
        assert again.store.get_setting("port_base") == 25432
        made = again.create_branch("moved-port")
        assert not 32768 <= made["port"] <= 60999
        again.close()
    finally:
        teardown_platform(Tierbase(home), home.parent)
