"""The provider boundary: what the control plane asks of the substrate.

The control plane speaks only in branch names, volumes and ports; this local
provider turns that into a storage driver plus postgres processes. A remote
provider (for instance one over Neon's API) would implement the same methods.
"""

from __future__ import annotations

from pathlib import Path

from .compute import SUPERUSER, Endpoint, Postgres
from .control.locks import branch_lock
from .storage import Source, VolumeDriver


class LocalProvider:
    def __init__(self, home: Path, driver: VolumeDriver, pg: Postgres) -> None:
        self.home = home
        self.driver = driver
        self.pg = pg
        self.locks = home / "locks"
        self.logs = home / "logs"
        #: every compute's unix socket: a 0700 directory of the compute user, so that only it (the
        #: service) and root can reach the sockets, where peer auth maps them to the platform roles
        self.sockets = home / "sockets"

    @property
    def copy_on_write(self) -> bool:
        return self.driver.copy_on_write

    def endpoint(self, port: int, dbname: str = "postgres", role: str = SUPERUSER) -> Endpoint:
        """The platform's own way in to a compute, as one of the fixed roles (peer auth, no password)."""
        return Endpoint(str(self.sockets), port, role, "", dbname)

    def _ensure_sockets(self) -> None:
        if not self.sockets.is_dir():
            self.sockets.mkdir(parents=True, exist_ok=True)
            self.pg.user.chown(self.sockets)
        self.sockets.chmod(0o700)

    def datadir(self, volume: str) -> Path:
        return self.driver.path(volume)

    # -- branches ------------------------------------------------------------
    def create_root(self, volume: str) -> None:
        path = self.driver.create(volume)
        try:
            self.pg.initdb(path)
        except BaseException:
            self.driver.delete(volume)
            raise

    def fork(self, parent: str, parent_volume: str, parent_port: int, volume: str, *,
             readonly: bool = False) -> str:
        """Copy the parent as of now; returns the fork LSN.

        A running parent is checkpointed first, so that the copy needs almost
        no WAL replay when it starts; every commit acknowledged before this
        call is in the copy either way (the snapshot is crash-consistent).
        """
        with branch_lock(self.locks, parent, shared=True):
            running = self.pg.running_pid(self.datadir(parent_volume)) is not None
            ep = self.endpoint(parent_port) if running else None
            lsn = self.pg.checkpoint(ep) if ep else ""
            self.driver.clone(Source(parent_volume, ep), volume, readonly=readonly)
        try:
            if not readonly:
                self.pg.clear_runtime_files(self.datadir(volume))
            if not lsn:
                lsn = self.pg.controldata_lsn(self.datadir(volume))
        except BaseException:
            self.driver.delete(volume)
            raise
        return lsn

    def delete(self, name: str, volume: str) -> None:
        self.stop(name, volume)
        self.driver.delete(volume)

    # -- computes ------------------------------------------------------------
    def start(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> int:
        self._ensure_sockets()
        with branch_lock(self.locks, name):
            return self.pg.start(self.datadir(volume), port, self.logs / f"{name}.log", name=name,
                                 sockets=self.sockets, settings=settings)

    def start_private(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> Endpoint:
        """Start a compute reachable only through a unix socket in a 0700 directory: nobody else can
        connect while the platform prepares the branch (masks it)."""
        sockdir = self.home / "run" / name
        sockdir.mkdir(parents=True, exist_ok=True)
        self.pg.user.chown(sockdir)
        sockdir.chmod(0o700)
        with branch_lock(self.locks, name):
            self.pg.start(self.datadir(volume), port, self.logs / f"{name}.log", name=name, sockets=self.sockets,
                          private=sockdir, settings=settings)
        return Endpoint(str(sockdir), port, SUPERUSER)

    def stop(self, name: str, volume: str) -> bool:
        with branch_lock(self.locks, name):
            return self.pg.stop(self.datadir(volume))

    def running_pid(self, volume: str) -> int | None:
        return self.pg.running_pid(self.datadir(volume))

    def own_bytes(self, volume: str) -> int:
        return self.driver.own_bytes(volume)
