"""Where a platform keeps its files (TIERBASE_HOME) and how it finds them."""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import TierbaseError


def default_home() -> Path:
    env = os.environ.get("TIERBASE_HOME")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        # root's own home is 0700: the unprivileged compute user could not reach data under it
        return Path("/var/lib/tierbase")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "tierbase"


@dataclass(frozen=True)
class Home:
    root: Path

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

    def make(self, compute_uid: int | None) -> None:
        """Create the data dir; make sure the compute user can reach into it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TierbaseError(f"cannot create the data dir {self.root}: {err.strerror}",
                                "Choose another TIERBASE_HOME") from err
        self.root.chmod(0o711)
        self.logs.mkdir(exist_ok=True)
        if compute_uid is not None and compute_uid != os.geteuid():
            os.chown(self.logs, compute_uid, -1)
            for parent in self.root.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    raise TierbaseError(
                        f"the compute user cannot reach {self.root}: {parent} is not searchable by others",
                        f"Choose a TIERBASE_HOME outside {parent} (for example /var/lib/tierbase), "
                        f"or `chmod o+x {parent}`",
                    )

    @staticmethod
    def write_secret(path: Path, value: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)

    def read_secret(self, path: Path, create: bool = False) -> str:
        if not path.exists():
            if not create:
                raise TierbaseError(f"{path} is missing", "Run `tierbase up` to initialise this data dir")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        return path.read_text().strip()
