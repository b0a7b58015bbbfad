"""Postgres processes: initdb, start, stop, checkpoint, liveness.

A compute is one postmaster serving one data directory on a loopback TCP port.
Processes are started through ``pg_ctl -W`` so the postmaster is re-parented
away from the caller (the CLI may exit, the service never accumulates
zombies); readiness is then polled from ``postmaster.pid`` ourselves at a
finer grain than pg_ctl's 100 ms loop.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from ..errors import ComputeError, DiskFull
from ..procs import pid_alive
from ..provider.types import PLATFORM_SLOTS, SUPERUSER, ComputeUser, Endpoint
from ..settings import value
from .binaries import PgBinaries, compute_user, find_binaries

# Settings every cluster gets at initdb; inherited by every branch through the snapshot.
BASE_CONF = """
# --- tierbase: settings below are managed by tierbase ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
shared_buffers = 64MB
max_connections = 200
password_encryption = 'scram-sha-256'
logging_collector = off
log_line_prefix = '%m [%p] '
"""
#: pg_ident map naming the OS users that may log in over the unix socket, and as which roles
IDENT_MAP = "tierbase"
# Who may log in how. The unix socket lives in a 0700 directory of the compute user, and peer
# auth maps only that OS user (the service) and root (the library used in-process by root) to
# the platform's roles. Over TCP only the platform engineers' own direct roles (group tb_direct)
# log in, with SCRAM; the superuser and every principal role are refused there.
HBA = """# tierbase: managed; see tierbase/compute/postgres.py
local   all             all                                     peer map=tierbase
local   replication     all                                     peer map=tierbase
host    all             +tb_direct      127.0.0.1/32            scram-sha-256
host    all             +tb_direct      ::1/128                 scram-sha-256
host    all             all             0.0.0.0/0               reject
host    all             all             ::/0                    reject
"""
# The fixed roles (see roles.py), made once in the root cluster and inherited by every branch.
# tb_owner is a member of the NOLOGIN role ``postgres`` so that dumps saying `OWNER TO postgres`
# restore as they are; it owns the ``postgres`` database (and with it the ``public`` schema,
# whose owner is pg_database_owner since PostgreSQL 15).
ROLES_SQL = """CREATE ROLE postgres NOLOGIN;

CREATE ROLE tb_owner LOGIN NOSUPERUSER NOCREATEROLE CREATEDB NOREPLICATION NOBYPASSRLS IN ROLE postgres, pg_checkpoint;

CREATE ROLE tb_reader LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS IN ROLE pg_read_all_data;

ALTER ROLE tb_reader SET default_transaction_read_only = on;

CREATE ROLE tb_direct NOLOGIN;

ALTER DATABASE postgres OWNER TO tb_owner;

"""
# Skip the fork-time CHECKPOINT when less WAL than this was written since the last one.
CHECKPOINT_MIN_WAL: int = value("checkpoint_min_wal")
# Files of a running cluster that must not travel into a copy of it.
RUNTIME_FILES = ("postmaster.pid", "postmaster.opts")


def _space_error(err: BaseException | str, where: Path) -> DiskFull:
    return DiskFull(
        f"no space left on the device holding {where}",
        "Free space there, or give tierbase more room (`tierbase up --btrfs-size` or another TIERBASE_HOME)",
    )


class Postgres:
    """Operations on Postgres data directories, run as the compute user."""

    def __init__(self, bins: PgBinaries | None = None, user: ComputeUser | None = None) -> None:
        self.bins = bins or find_binaries()
        self.user = user or compute_user()

    # -- running tools -------------------------------------------------------
    def run(self, args: list[str], *, what: str, where: Path, timeout: float = 600,
            input_text: str | None = None, env: dict[str, str] | None = None) -> str:
        try:
            got = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout, input=input_text, env=env,
                cwd="/", **self.user.run_kwargs(),  # type: ignore[call-overload]
            )
        except subprocess.TimeoutExpired as err:
            raise ComputeError(f"{what} did not finish within {timeout:.0f}s", "Check the machine's load") from err
        if got.returncode != 0:
            text = (got.stderr or got.stdout).strip()
            if "No space left" in text or "could not extend file" in text:
                raise _space_error(text, where)
            raise ComputeError(f"{what} failed: {text[-800:]}", "See the message above")
        return str(got.stdout)

    # -- creating ------------------------------------------------------------
    def initdb(self, datadir: Path) -> None:
        """Create a cluster whose superuser ``tierbase`` has no password: it is reached by peer auth only."""
        self.run(
            [self.bins["initdb"], "-D", str(datadir), "-U", SUPERUSER, "--auth-local=peer", "--auth-host=reject",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions", "--no-sync"],
            what="initdb", where=datadir,
        )
        self.write_settings(datadir)
        self.run([self.bins["postgres"], "--single", "-D", str(datadir), "-j", "postgres"],
                 what="creating the platform's roles", where=datadir, input_text=ROLES_SQL)
        # --no-sync above keeps initdb fast; make the result durable once, at the end.
        self.run(["sync", "-f", str(datadir)], what="sync", where=datadir)

    def write_settings(self, datadir: Path) -> None:
        conf = datadir / "postgresql.conf"
        try:
            text = conf.read_text()
            if "--- tierbase:" not in text:
                conf.write_text(text + BASE_CONF)
            (datadir / "pg_hba.conf").write_text(HBA)
            (datadir / "pg_ident.conf").write_text(ident_conf(self.user.name))
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _space_error(err, datadir) from err
            raise

    @staticmethod
    def clear_runtime_files(datadir: Path) -> None:
        """A copy taken from a running cluster carries its parent's lock file: drop it."""
        for name in RUNTIME_FILES:
            (datadir / name).unlink(missing_ok=True)

    @staticmethod
    def forget_slots(datadir: Path, prefix: str = "") -> None:
        """A copy is nobody's replication source: drop the slots it inherited (a logical slot would keep
        its WAL forever, and stop it from starting at all under wal_level=replica). ``prefix``: only
        those slots (a compute starting below wal_level=logical drops the platform's own)."""
        slots = datadir / "pg_replslot"
        for entry in slots.iterdir() if slots.is_dir() else ():
            if entry.name.startswith(prefix):
                shutil.rmtree(entry, ignore_errors=True)

    # -- liveness ------------------------------------------------------------
    @staticmethod
    def running_pid(datadir: Path) -> int | None:
        """The postmaster pid serving ``datadir``, if one is alive."""
        try:
            lines = (datadir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if len(lines) > 1 and Path(lines[1]) != datadir and Path(lines[1]).resolve() != datadir.resolve():
            return None  # a lock file copied from another cluster
        return pid if pid_alive(pid) else None

    @staticmethod
    def is_ready(datadir: Path, states: tuple[str, ...] = ("ready",)) -> bool:
        """``states``: what counts as ready in postmaster.pid (a recovery waits for "standby")."""
        try:
            lines = (datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() in states

    # -- start / stop ----------------------------------------------------------
    def start(self, datadir: Path, port: int, logfile: Path, *, name: str, sockets: Path, timeout: float = 120,
              private: Path | None = None, settings: dict[str, str] | None = None,
              ready: tuple[str, ...] = ("ready",)) -> int:
        """Start the postmaster: loopback TCP (direct roles only) and a unix socket in ``sockets``;
        ``private``: no TCP, and the socket in that (0700) directory instead. ``settings``: for this
        start only (archiving, a recovery target), on the command line so that no copy inherits them."""
        if (pid := self.running_pid(datadir)) is not None:
            # started by someone else (another process's start, a restart): answer once it is ready
            deadline = time.monotonic() + timeout
            while (not self.is_ready(datadir, ready) and self.running_pid(datadir) == pid
                   and time.monotonic() < deadline):
                time.sleep(0.005)
            if self.running_pid(datadir) == pid:
                return pid
        self.clear_runtime_files(datadir)
        if (settings or {}).get("wal_level") != "logical":
            # a promotion's slot (migrate/logical.py) on a tier now started without logical decoding
            # (rollback_replay = diff): postgres would refuse to start with it
            self.forget_slots(datadir, PLATFORM_SLOTS)
        _clear_stale_socket(private or sockets, port)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        if not logfile.exists():
            logfile.touch()
            self.user.chown(logfile)
        offset = logfile.stat().st_size
        self.run(
            [self.bins["pg_ctl"], "start", "-W", "-D", str(datadir), "-l", str(logfile), "-s",
             "-o", f"-p {port} -c cluster_name=tierbase-{name}" + (
                 f" -c listen_addresses='' -c unix_socket_directories='{private}'" if private
                 else f" -c unix_socket_directories='{sockets}'") + "".join(
                     f" -c {k}={shlex.quote(v)}" for k, v in (settings or {}).items())],
            what=f"starting the compute of {name!r}", where=datadir,
        )
        deadline = time.monotonic() + timeout
        seen_pid = False
        while time.monotonic() < deadline:
            if self.is_ready(datadir, ready) and (pid := self.running_pid(datadir)) is not None:
                return pid
            if self.running_pid(datadir) is not None:
                seen_pid = True
            elif seen_pid or _log_has_fatal(logfile, offset):
                break
            time.sleep(0.005)
        reason = _log_tail(logfile, offset)
        self.stop(datadir, mode="immediate")
        raise ComputeError(
            f"the compute of {name!r} did not start: {reason or 'no message in its log'}",
            f"See the full log at {logfile}",
            log=str(logfile),
        )

    def stop(self, datadir: Path, mode: str = "fast", timeout: float = 60) -> bool:
        """Stop the postmaster of ``datadir``; True if one was running."""
        pid = self.running_pid(datadir)
        if pid is None:
            return False
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.01)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.01)
        return True

    # -- sql -----------------------------------------------------------------
    @staticmethod
    def checkpoint(ep: Endpoint, min_wal: int = CHECKPOINT_MIN_WAL) -> str:
        """CHECKPOINT unless little WAL was written since the last one; return the fork LSN.

        A copy needs to replay the WAL written since the last checkpoint when it
        starts. Below ``min_wal`` bytes that replay is cheaper (~0.1 s) than a
        CHECKPOINT on a busy parent (0.2-0.5 s of the parent's I/O), so skip it.
        """
        with psycopg.connect(ep.dsn(), autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn() - redo_lsn FROM pg_control_checkpoint()").fetchone()
            if row is None or row[0] is None or int(row[0]) >= min_wal:
                conn.execute("CHECKPOINT")
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        return str(lsn[0]) if lsn else ""

    def controldata_lsn(self, datadir: Path) -> str:
        out = self.run([self.bins["pg_controldata"], "-D", str(datadir)], what="pg_controldata", where=datadir,
                       timeout=30)
        for line in out.splitlines():
            if line.startswith("Latest checkpoint's REDO location:"):
                return line.split(":", 1)[1].strip()
        return ""


def _clear_stale_socket(directory: Path, port: int) -> None:
    """Remove the socket lock of a compute that died (kill -9): postgres itself takes an unreaped
    zombie's pid in it for a live server and refuses to start. The port is this branch's own."""
    lock = directory / f".s.PGSQL.{port}.lock"
    try:
        pid = int(lock.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    if not pid_alive(pid):
        lock.unlink(missing_ok=True)
        (directory / f".s.PGSQL.{port}").unlink(missing_ok=True)


def ident_conf(service_user: str) -> str:
    """pg_ident.conf: the service's OS user (and root, for in-process use) may be the platform roles."""
    from .roles import PLATFORM_ROLES

    users = dict.fromkeys((service_user, "root"))
    lines = [f"{IDENT_MAP:<12} {u:<20} {role}" for u in users for role in PLATFORM_ROLES]
    return "# tierbase: managed; MAPNAME SYSTEM-USERNAME PG-USERNAME\n" + "\n".join(lines) + "\n"


def _log_has_fatal(logfile: Path, offset: int) -> bool:
    return any(w in _log_tail(logfile, offset) for w in ("FATAL", "PANIC"))


def _log_tail(logfile: Path, offset: int) -> str:
    try:
        with open(logfile, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if any(w in ln for w in ("FATAL", "PANIC", "ERROR"))]
    return "; ".join(lines[-3:]) if lines else text.strip()[-300:]
