"""What the proxy benchmark runs against: a platform started with `tierbase up`, and PgBouncer beside it.

The platform is the users' own: ``tierbase up`` in a subprocess (its service runs the proxy that is
measured), URLs from ``tierbase branch url``, ``tierbase down --purge`` at the end, always.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import free_port, log, port_free

REPO = Path(__file__).resolve().parents[1]
PGBOUNCER = "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class Way:
    """One way in to the benchmark branch: where a client connects and as whom."""

    name: str
    host: str
    port: int
    user: str
    password: str
    dbname: str
    sslmode: str = "disable"  # the same for all three: the direct compute and PgBouncer have no TLS
    relay_pid: int | None = None  # the process between client and compute (the service, PgBouncer), if any

    @classmethod
    def from_url(cls, name: str, url: str) -> Way:
        d = conninfo_to_dict(url)
        return cls(name, str(d["host"]), int(str(d["port"])), str(d["user"]), str(d["password"]), str(d["dbname"]))

    def dsn(self) -> str:
        return make_conninfo(host=self.host, port=self.port, user=self.user, password=self.password,
                             dbname=self.dbname, sslmode=self.sslmode)

    def with_tls(self) -> Way:
        return replace(self, name=f"{self.name} (TLS)", sslmode="require")

    def env(self) -> dict[str, str]:
        """libpq's environment for pgbench: the password and sslmode never on its command line."""
        return dict(os.environ, PGPASSWORD=self.password, PGSSLMODE=self.sslmode)

    def pgbench_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process (all its threads, live or gone) has used so far; 0 for no process."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(args, capture_output=True, text=True, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} {' '.join(args[1:3])} failed ({got.returncode}): "
                           f"{(got.stderr or got.stdout).strip()[-800:]}")
    return got


def free_port_base() -> int:
    """Computes' ports above the kernel's ephemeral range (and away from the test suite's)."""
    for _ in range(100):
        base = 61000 + secrets.randbelow(40) * 100
        if all(port_free(p) for p in range(base, base + 20)):
            return base
    raise RuntimeError("no free port range in 61000-65000")


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


class Platform:
    """A running tierbase of a throwaway data dir, driven through its CLI as a user would."""

    def __init__(self, root: Path, btrfs_size: str, up_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.up_args = up_args  # more `tierbase up` options a benchmark needs (they come last, so they win)
        self.home = root / "home"
        self.btrfs_size = btrfs_size
        # the service must run this checkout's code, whatever tierbase is installed
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # the owner's token of this platform only: no TIERBASE_TOKEN or ~/.config/tierbase/token of another
        self.env = {k: v for k, v in os.environ.items() if k != "TIERBASE_TOKEN"}
        self.env.update(TIERBASE_HOME=str(self.home), TIERBASE_PORT_BASE=str(free_port_base()), PYTHONPATH=path,
                        XDG_CONFIG_HOME=str(root / "config"))
        self.up_info: dict[str, Any] = {}
        self.token = ""

    def cli(self, *args: str, timeout: float = 600) -> Any:
        """``tierbase ARGS --json``; its JSON, or RuntimeError with the CLI's own message."""
        got = subprocess.run([sys.executable, "-m", "tierbase.cli.main", *args, "--json"], env=self.env,
                             capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if got.returncode != 0:
            raise RuntimeError(f"`tierbase {' '.join(args)}` failed ({got.returncode}): {got.stderr.strip()}")
        return json.loads(got.stdout)

    def service_pid(self) -> int:
        return int(self.cli("status")["service_pid"])

    def up(self) -> None:
        # idle suspend off: a compute stopped by the service between two runs would measure a cold start
        self.up_info = self.cli("up", "--storage", "btrfs", "--btrfs-size", self.btrfs_size, "--api-port",
                                str(free_port()), "--proxy-port", str(free_port()), "--idle-timeout", "0",
                                *self.up_args)
        self.token = (self.home / "api.token").read_text().strip()  # the owner principal's, made by `up`
        self.env["TIERBASE_TOKEN"] = self.token

    def down(self) -> list[str]:
        """``tierbase down --purge``; what it said. A failure is only logged: ``leftovers`` tells what survived."""
        said: list[str] = []
        try:
            said = list(self.cli("down", "--purge", timeout=300).get("said", []))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
            log(f"WARNING: {err}")
        return said

    def leftovers(self) -> list[str]:
        """Postgres processes, mounts and loop devices of this run still present (should be none)."""
        left = []
        mounts = Path("/proc/mounts").read_text().splitlines()
        left += [f"mount {m.split()[1]}" for m in mounts if m.split()[1].startswith(str(self.root))]
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
        left += [f"loop device {ln}" for ln in loops if str(self.root) in ln]
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with suppress(OSError):
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if str(self.root) in cmd and proc.name != str(os.getpid()):
                        left.append(f"process {proc.name}: {cmd.strip()[:120]}")
        return left


@contextmanager
def platform(btrfs_size: str, *up_args: str) -> Iterator[Platform]:
    """A platform for the length of the block; `tierbase down --purge` however the block ends."""
    root = Path(tempfile.mkdtemp(prefix="tierbase-bench-proxy-", dir="/tmp"))
    root.chmod(0o711)  # the compute user must reach into it
    p = Platform(root, btrfs_size, up_args)
    ok = False
    try:
        log(f"tierbase up (data dir {p.home})")
        p.up()
        yield p
        ok = True
    finally:
        log("tierbase down --purge")
        for line in p.down():
            log(f"  {line}")
        left = p.leftovers()
        for item in left:
            log(f"WARNING: left behind: {item}")
        if not left:
            shutil.rmtree(root, ignore_errors=True)
        elif ok:  # the measurements are fine, but the machine is not as it was: say so, non-zero
            raise RuntimeError(f"`tierbase down --purge` left {len(left)} thing(s) of this run behind (listed "
                               f"above). Remove them, then {root}")


@contextmanager
def pgbouncer(sockets: Path, compute_port: int, user: str, scram_verifier: str,
              dbname: str) -> Iterator[tuple[int, int]]:
    """PgBouncer in front of the compute on the proxy's own path, as the postgres OS user.

    Clients authenticate with SCRAM against the principal's verifier (as at the proxy); PgBouncer logs in
    to the compute over the same private unix socket directory as ``tb_owner`` (peer auth), session pooling.
    Its output goes to its log file only (an unread pipe would block it once full), and it does not log
    every connection (a line per login and logout would be a cost the proxy does not pay).
    """
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tierbase-bench-pgbouncer-"))
    (work / "userlist.txt").write_text(f'"{user}" "{scram_verifier}"\n')
    (work / "pgbouncer.ini").write_text(f"""\
[databases]
{dbname} = host={sockets} port={compute_port} dbname=postgres user=tb_owner

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {work}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
log_connections = 0
log_disconnections = 0
logfile = {work}/pgbouncer.log
pidfile = {work}/pgbouncer.pid
""")
    for p in [work, *work.iterdir()]:
        shutil.chown(p, "postgres", "postgres")
    (work / "userlist.txt").chmod(0o600)
    proc = subprocess.Popen([PGBOUNCER, str(work / "pgbouncer.ini")], user="postgres", group="postgres",
                            extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            wait_port(port)
        except RuntimeError as err:
            logged = (work / "pgbouncer.log").read_text(errors="replace") if (work / "pgbouncer.log").exists() else ""
            raise RuntimeError(f"PgBouncer did not start: {logged.strip()[-600:] or err}") from err
        yield port, proc.pid  # it runs in the foreground (no -d): this pid is PgBouncer itself
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
