"""The local provider: a volume driver plus postgres processes on this host.

It owns everything the control plane must not see: data directories, unix
socket directories, logs, lock files, the compute user and the postgres
binaries. The control plane reaches it only through the methods of the
``Provider`` protocol (protocol.py).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from ..compute import Postgres, roles
from ..compute.pooler import poolers_for
from ..compute.restore import restore_dump
from ..errors import NotSupported, StorageError
from ..storage import DEFAULT_IMAGE_SIZE, BtrfsDriver, CopyDriver, Source, VolumeDriver, choose_driver, quota
from ..storage.btrfs import fs_type, is_mounted
from ..storage.copy import Backup
from .locks import branch_lock
from .protocol import Pooler, Provider
from .types import OWNER_ROLE, SUPERUSER, Endpoint, ForkPoint, Health, PoolSpace


def make_driver(kind: str, home: Path, pg: Postgres, *, image_size: str = DEFAULT_IMAGE_SIZE) -> VolumeDriver:
    """Build the driver named ``kind``; ``auto`` picks btrfs whenever it can work here."""
    root = home / "volumes"
    kind = choose_driver(kind)
    if kind == "auto":
        kind = "btrfs" if BtrfsDriver.usable(root) else "copy"
    if kind == "copy":
        return CopyDriver(root, pg.user, _basebackup(pg))
    if not BtrfsDriver.usable(root):
        raise StorageError("the btrfs driver cannot work here: the data dir is not on btrfs and tierbase is not "
                           "root (or btrfs-progs is missing)",
                           "Install btrfs-progs and run as root, put TIERBASE_HOME on btrfs, or use --storage copy")
    on_btrfs = fs_type(root) == "btrfs" and not (home / "btrfs.img").exists()
    return BtrfsDriver(root, pg.user, image=None if on_btrfs else home / "btrfs.img", image_size=image_size)


def _basebackup(pg: Postgres) -> Backup:
    """The copy driver's online copy of a running cluster, run as the compute user."""
    def backup(ep: Endpoint, path: Path) -> None:
        pg.run([pg.bins["pg_basebackup"], "-D", str(path), "-h", ep.host, "-p", str(ep.port), "-U", ep.user,
                "-X", "stream", "-c", "fast", "-w"],
               what="pg_basebackup", where=path, env=dict(os.environ, PGPASSWORD=ep.password))
    return backup


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

    @classmethod
    def open(cls, home: Path, kind: str, *, image_size: str = DEFAULT_IMAGE_SIZE) -> LocalProvider:
        """The provider of the data dir ``home`` with storage driver ``kind`` (auto, btrfs, copy)."""
        pg = Postgres()
        return cls(home, make_driver(kind, home, pg, image_size=image_size), pg)

    @property
    def name(self) -> str:
        return self.driver.name

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

    # -- the substrate -----------------------------------------------------------
    def prepare(self) -> list[str]:
        """Mount (or make) the storage unless it is ready as it is."""
        if isinstance(self.driver, BtrfsDriver) and self.driver.image is not None and is_mounted(self.driver.root):
            return []
        return self.driver.prepare()

    def release(self, purge: bool = False) -> list[str]:
        return self.driver.release(purge=purge)

    def health(self) -> Health:
        bins = self.pg.bins
        return Health(driver=self.driver.name, copy_on_write=self.driver.copy_on_write,
                      compute_user=self.pg.user.name, postgres={"bindir": str(bins.bindir), "major": bins.major})

    def pooler(self) -> Pooler:
        return poolers_for(self.home, self.sockets)

    def space(self) -> PoolSpace:
        st = os.statvfs(self.driver.root)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        group = quota.usage(self.driver.root) if isinstance(self.driver, BtrfsDriver) else None
        if group is None or group.limit is None:
            return PoolSpace(total, free)
        return PoolSpace(total, free, group.used, group.limit)

    def isolate(self, reserve: int) -> list[str]:
        """Root, at ``up``: simple quotas on, the features group limited to what features hold now plus
        the free space above the reserve. Without root, btrfs or kernel support: nothing (the
        control plane's create-time reserve check still holds)."""
        if not isinstance(self.driver, BtrfsDriver) or os.geteuid() != 0:
            return []
        try:
            said = quota.enable(self.driver.root)
        except StorageError as err:
            return [f"warning: {err.message}; feature branches are held only by the create-time reserve check"]
        st = os.statvfs(self.driver.root)
        free = st.f_bavail * st.f_frsize
        group = quota.usage(self.driver.root)
        used = group.used if group is not None else 0
        limit = used + max(0, free - reserve)
        quota.set_limit(self.driver.root, limit)
        mib = 1024 ** 2
        said.append(f"feature branches may hold {limit / mib:,.0f} MiB together "
                    f"({reserve / mib:,.0f} MiB of {st.f_blocks * st.f_frsize / mib:,.0f} MiB kept for tiers)")
        return said

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        return branch_lock(self.locks, name, shared=shared)

    # -- branches ------------------------------------------------------------
    def create_root(self, volume: str) -> None:
        path = self.driver.create(volume)
        try:
            self.pg.initdb(path)
        except BaseException:
            self.driver.delete(volume)
            raise

    def fork(self, parent: str, parent_volume: str, parent_port: int, volume: str, *,
             readonly: bool = False, limited: bool = False, at: ForkPoint | None = None) -> str:
        """Copy the parent as of now; returns the fork LSN.

        A running parent is checkpointed first, so that the copy needs almost
        no WAL replay when it starts; every commit acknowledged before this
        call is in the copy either way (the snapshot is crash-consistent).
        """
        if at is not None:
            raise NotSupported(f"branching {parent!r} at {at} is not supported by the {self.driver.name!r} "
                               "storage yet", "Branch it as of now (no --at), or restore a snapshot branch")
        with self.lock(parent, shared=True):
            running = self.pg.running_pid(self.datadir(parent_volume)) is not None
            ep = self.endpoint(parent_port) if running else None
            lsn = self.pg.checkpoint(ep) if ep else ""
            self.driver.clone(Source(parent_volume, ep), volume, readonly=readonly, limited=limited)
        try:
            if not readonly:
                self.pg.clear_runtime_files(self.datadir(volume))
                self.pg.forget_slots(self.datadir(volume))
            if not lsn:
                lsn = self.pg.controldata_lsn(self.datadir(volume))
        except BaseException:
            self.driver.delete(volume)
            raise
        return lsn

    def delete(self, name: str, volume: str) -> None:
        # immediate: the volume is about to go, so a shutdown checkpoint (every dirty buffer written and
        # fsynced) would be work thrown away; it was most of a session's end on a busy branch
        with self.lock(name):
            self.pg.stop(self.datadir(volume), mode="immediate")
        self.driver.delete(volume)

    def discard(self, volume: str) -> None:
        self.driver.delete(volume)

    def volumes(self) -> list[str]:
        return self.driver.volumes()

    def own_bytes(self, volume: str) -> int:
        return self.driver.own_bytes(volume)

    # -- computes ------------------------------------------------------------
    def start(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> int:
        self._ensure_sockets()
        with self.lock(name):
            return self.pg.start(self.datadir(volume), port, self.logs / f"{name}.log", name=name,
                                 sockets=self.sockets, settings=settings)

    def start_private(self, name: str, volume: str, port: int, settings: dict[str, str] | None = None) -> Endpoint:
        """Start a compute reachable only through a unix socket in a 0700 directory: nobody else can
        connect while the platform prepares the branch (masks it)."""
        sockdir = self.home / "run" / name
        sockdir.mkdir(parents=True, exist_ok=True)
        self.pg.user.chown(sockdir)
        sockdir.chmod(0o700)
        with self.lock(name):
            self.pg.start(self.datadir(volume), port, self.logs / f"{name}.log", name=name, sockets=self.sockets,
                          private=sockdir, settings=settings)
        return Endpoint(str(sockdir), port, SUPERUSER)

    def stop(self, name: str, volume: str) -> bool:
        with self.lock(name):
            return self.pg.stop(self.datadir(volume))

    def running_pid(self, volume: str) -> int | None:
        return self.pg.running_pid(self.datadir(volume))

    def ready(self, volume: str) -> bool:
        datadir = self.datadir(volume)
        return self.pg.running_pid(datadir) is not None and Postgres.is_ready(datadir)

    def restore(self, port: int, dump: Path, dbname: str) -> str:
        admin = self.endpoint(port)  # creates (and after a failure drops) the import's database
        # who restores: the branch owner's role, never the superuser: a dump can do no more than its
        # importer could in SQL (no COPY PROGRAM, no server files), into a database that role owns
        restorer = self.endpoint(port, dbname, role=OWNER_ROLE)
        return restore_dump(self.pg, admin, restorer, dump, dbname).value


    def direct_login(self, port: int, principal: str, verifier: str) -> str:
        return roles.direct_login(self.endpoint(port).dsn(), principal, verifier)


def _conforms(p: LocalProvider) -> Provider:
    return p  # mypy checks here that the local provider is a Provider
