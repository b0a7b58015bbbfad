"""Transaction pooling: one PgBouncer per running compute, behind the proxy's pooled port.

A client of the pooled URL authenticates at the tierbase proxy like any other (SCRAM, policy,
the compute role chosen by the platform); the proxy then logs in to the branch's PgBouncer,
which shares a few server connections among all the clients in transaction mode. So many
short-lived agent connections cost the compute ``POOL_SIZE`` backends, not one each.

PgBouncer listens only on a unix socket in ``sockets/pool`` (0700, the service user's), at the
compute's own port number, and trusts who reaches it: that is the proxy (and root), the same
boundary as the compute's own socket with peer auth. It logs in to the compute over the compute's
socket as the role the proxy asked for (``tb_owner`` or ``tb_reader``; never the superuser, which
its auth file does not list). It starts on the first pooled connection and is stopped once its
compute is (the service's sweep), at ``down``, and when the service stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from ..errors import ComputeError
from ..procs import pid_alive
from ..provider.types import ComputeUser
from .binaries import compute_user
from .roles import OWNER_ROLE, READER_ROLE

POOL_SIZE = 20
MAX_CLIENTS = 2000
#: server connections idle this long are closed, so an idle branch's compute can be suspended
SERVER_IDLE_TIMEOUT = 10

_INI = """\
[databases]
* = host={sockets} port={port}

[pgbouncer]
listen_addr =
listen_port = {port}
unix_socket_dir = {pool}
unix_socket_mode = 0700
auth_type = trust
auth_file = {auth}
pool_mode = transaction
default_pool_size = {size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {clients}
max_db_connections = {size}
server_idle_timeout = {idle}
server_lifetime = 3600
ignore_startup_parameters = extra_float_digits,options,search_path,statement_timeout
log_connections = 0
log_disconnections = 0
logfile = {log}
pidfile = {pid}
"""


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
                                               if os.access(p, os.X_OK)), None)
    if found is None:
        raise ComputeError("PgBouncer is not installed, and pooled connections need it",
                           "Install it (Debian: `apt-get install pgbouncer`, or scripts/install-deps.sh), "
                           "or use the branch's direct URL (without --pooled)")
    return found


class Poolers:
    """The PgBouncers of one data dir, one per compute port."""

    def __init__(self, root: Path, sockets: Path, user: ComputeUser | None = None) -> None:
        self.sockets = sockets
        self.dir = sockets / "pool"
        self.state = root / "pool"
        self.user = user or compute_user()
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _pidfile(self, port: int) -> Path:
        return self.state / f"{port}.pid"

    def running(self, port: int) -> int | None:
        try:
            pid = int(self._pidfile(port).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def ensure(self, port: int) -> str:
        """The socket directory of the PgBouncer in front of the compute on ``port`` (started if need be)."""
        with self._guard:
            lock = self._locks.setdefault(port, threading.Lock())
        with lock:
            if self.running(port) is None or not self._socket(port).exists():
                self._start(port)
        return str(self.dir)

    def _socket(self, port: int) -> Path:
        return self.dir / f".s.PGSQL.{port}"

    def _start(self, port: int) -> None:
        for d in (self.dir, self.state):
            d.mkdir(mode=0o700, exist_ok=True)
            self.user.chown(d)
            d.chmod(0o700)
        auth = self.state / "users.txt"
        if not auth.exists():  # the roles the proxy logs in as; no password: trust, behind a 0700 directory
            auth.write_text(f'"{OWNER_ROLE}" ""\n"{READER_ROLE}" ""\n')
            self.user.chown(auth)
            auth.chmod(0o600)
        ini = self.state / f"{port}.ini"
        ini.write_text(_INI.format(sockets=self.sockets, port=port, pool=self.dir, auth=auth, size=POOL_SIZE,
                                   clients=MAX_CLIENTS, idle=SERVER_IDLE_TIMEOUT, log=self.state / f"{port}.log",
                                   pid=self._pidfile(port)))
        self.user.chown(ini)
        ini.chmod(0o600)
        self._socket(port).unlink(missing_ok=True)
        got = subprocess.run([pgbouncer_binary(), "-d", "-q", str(ini)], capture_output=True, text=True,
                             cwd="/", timeout=30, **self.user.run_kwargs())  # type: ignore[call-overload]
        deadline = time.monotonic() + 10
        while not (self._socket(port).exists() and self.running(port)):
            if got.returncode != 0 or time.monotonic() > deadline:
                tail = self._log_tail(port) or got.stderr.strip()
                raise ComputeError(f"PgBouncer for the compute on port {port} did not start: {tail}",
                                   f"See {self.state / f'{port}.log'}")
            time.sleep(0.005)

    def _log_tail(self, port: int) -> str:
        try:
            lines = (self.state / f"{port}.log").read_text().strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def stop(self, port: int) -> bool:
        pid = self.running(port)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)  # immediate shutdown (SIGINT would wait for the clients' transactions)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self._pidfile(port).unlink(missing_ok=True)
        return True

    def ports(self) -> list[int]:
        if not self.state.is_dir():
            return []
        return sorted(int(p.stem) for p in self.state.glob("*.pid") if p.stem.isdigit())

    def reap(self, running: set[int]) -> list[int]:
        """Stop the PgBouncers whose compute no longer runs."""
        return [port for port in self.ports() if port not in running and self.stop(port)]

    def stop_all(self) -> list[int]:
        return [port for port in self.ports() if self.stop(port)]


_poolers: dict[str, Poolers] = {}
_poolers_lock = threading.Lock()


def poolers_for(root: Path, sockets: Path) -> Poolers:
    """One Poolers per data dir and process (the locks that start each PgBouncer once live there)."""
    with _poolers_lock:
        got = _poolers.get(str(root))
        if got is None:
            got = _poolers[str(root)] = Poolers(root, sockets)
        return got
