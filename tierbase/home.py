"""Where a platform keeps its files (TIERBASE_HOME) and how it finds them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import TierbaseError
from .settings import from_env

TYPE_CHECKING = False  # not typing's: the CLI imports this module on every call
if TYPE_CHECKING:  # the provider is the platform's side
    from .provider.types import ComputeUser


def default_home() -> Path:
    env = from_env("home")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        # root's own home is 0700: the unprivileged compute user could not reach data under it
        return Path("/var/lib/tierbase")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "tierbase"


class Home:
    """The files of one data dir under ``root``.

    A plain value class, not a dataclass: the CLI imports this module on every call, and dataclasses
    imports inspect (~12 ms, a tenth of a `tierbase branch create`)."""

    __slots__ = ("root",)
    root: Path

    def __init__(self, root: Path) -> None:
        object.__setattr__(self, "root", root)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Home is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Home) and other.root == self.root

    def __hash__(self) -> int:
        return hash((Home, self.root))

    def __repr__(self) -> str:
        return f"Home(root={self.root!r})"

    def __reduce__(self) -> tuple[type[Home], tuple[Path]]:  # copy and pickle, as of a frozen dataclass
        return Home, (self.root,)

    @property
    def db(self) -> Path:
        return self.root / "meta.db"

    @property
    def secret(self) -> Path:
        return self.root / "superuser.secret"

    @property
    def token(self) -> Path:
        return self.root / "api.token"

    @property
    def service(self) -> Path:
        return self.root / "service.json"

    @property
    def service_log(self) -> Path:
        return self.root / "service.log"

    @property
    def image(self) -> Path:
        return self.root / "btrfs.img"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def marker(self) -> Path:
        """Written at init: proof that this directory is a tierbase data dir (``down --purge`` checks it)."""
        return self.root / ".tierbase-data-dir"

    def owned(self) -> bool:
        return self.marker.is_file()

    def write_marker(self) -> None:
        self.write_secret(self.marker, "tierbase data dir: `tierbase down --purge` may delete this directory\n")

    @property
    def uploads(self) -> Path:
        """Where the service spools uploaded dumps: 0700, its own; each file 0600, removed after use."""
        return self.root / "uploads"

    def exists(self) -> bool:
        return self.db.exists()

    def make(self, user: ComputeUser) -> None:
        """Create the data dir owned by the service user (who is also the compute user), mode 0700.

        Nobody else needs to look inside: clients reach the service by URL and token.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TierbaseError(f"cannot create the data dir {self.root}: {err.strerror}",
                                "Choose another TIERBASE_HOME") from err
        self.logs.mkdir(exist_ok=True)
        for path in (self.root, self.logs):
            path.chmod(0o700)
            user.chown(path)
        if not user.is_self:
            for parent in self.root.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    raise TierbaseError(
                        f"the compute user cannot reach {self.root}: {parent} is not searchable by others",
                        f"Choose a TIERBASE_HOME outside {parent} (for example /var/lib/tierbase), "
                        f"or `chmod o+x {parent}`",
                    )

    def hand_over(self, user: ComputeUser) -> None:
        """Give what root made in the data dir to the service user; take group and other access away.

        ``tierbase up`` as root mounts and sets up before it starts the unprivileged service; the files
        made on the way (SQLite's -wal/-shm, locks, secrets, logs) must be the service's afterwards.
        Certificates stay readable (they are public). Left to their owners: the volumes' contents
        (postgres owns its clusters; a mount is not walked), the btrfs image (root's: who can write a
        mounted filesystem's image can crash the kernel), and api.token (the OS owner's own credential;
        the service never reads it, and its owner is who may act without a token).
        """
        keep_owner = {self.token, self.image}
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if here == self.root and "volumes" in dirnames:
                dirnames.remove("volumes")
                _restrict(here / "volumes", user, 0o700)
            _restrict(here, user, 0o700)
            for name in filenames:
                path = here / name
                public = name.endswith(".crt")  # certificates are public by design (tls/*.crt are 0644)
                _restrict(path, None if path in keep_owner else user, 0o644 if public else None)

    def private_file(self, path: Path, user: ComputeUser) -> None:
        """Create ``path`` empty (if missing) as 0600 of the service user, before anything writes it.

        SQLite gives its -wal and -shm files the mode and, under root, the owner of the database file,
        so an empty meta.db made here keeps every later file of the store private to the service.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        user.chown(path)

    @staticmethod
    def write_secret(path: Path, value: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)

    def read_secret(self, path: Path, create: bool = False) -> str:
        if not path.exists():
            if not create:
                raise TierbaseError(f"{path} is missing", "Run `tierbase up` to initialise this data dir")
            import secrets  # only when a secret is made: the CLI imports this module on every call

            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        return path.read_text().strip()


def _restrict(path: Path, user: ComputeUser | None, mode: int | None) -> None:
    """Own ``path`` by ``user`` (None: keep the owner) and drop group/other bits (or set ``mode``)."""
    try:
        st = path.lstat()
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return  # sockets and fifos belong to the process that made them
        if user is not None and not user.is_self and (st.st_uid, st.st_gid) != (user.uid, user.gid):
            os.chown(path, user.uid, user.gid)
        want = mode if mode is not None else stat.S_IMODE(st.st_mode) & 0o700
        if stat.S_IMODE(st.st_mode) != want:
            path.chmod(want)
    except FileNotFoundError:
        pass  # a lock or socket that went away while we walked
