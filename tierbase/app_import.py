"""Facade methods of importing a pg_dump into a branch.

Over the API the dump arrives as the request's bytes, spooled by the service into a private file of
its own (``new_upload``); nothing here opens a path a principal named. ``import_dump`` with a path is
for in-process library use, where the caller's files are already the caller's to read.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .app_base import Core
from .errors import InvalidInput, UploadTooLarge
from .governance.policy import Action
from .provider import DATABASE_NAME, directory_script, parse_size
from .settings import default

#: setting ``import_max_bytes`` (`tierbase up --import-limit`): the largest dump an import accepts
DEFAULT_IMPORT_LIMIT: int = default("import_max_bytes")


def check_database(dbname: str) -> str:
    if not DATABASE_NAME.fullmatch(dbname):
        raise InvalidInput(f"database name {dbname!r} is not accepted for an import",
                           "Use 1-63 of letters, digits, '_', '$' and '-', starting with a letter or '_'")
    return dbname


def too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"the dump is larger than the import limit of {_size(limit)}; nothing was restored",
                          "Import a smaller dump, or ask a platform engineer to raise the limit "
                          "(`tierbase up --import-limit SIZE`)", limit=limit)


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:g} {unit}"
    return f"{n} bytes"


class Imports:
    """Takes the core only."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def import_limit(self) -> int:
        return int(self.core.store.get_setting("import_max_bytes", DEFAULT_IMPORT_LIMIT))

    def set_import_limit(self, size: str) -> int:
        limit = parse_size(size)
        self.core.store.set_setting("import_max_bytes", limit)
        return limit

    def import_check(self, branch: str, dbname: str = "postgres") -> int:
        """Before an upload is read: refuse a bad name or a principal who may not import here (the denial
        is audited); returns the size limit the upload must keep."""
        check_database(dbname)
        self.core.require(Action.BRANCH_IMPORT, self.core.subject(branch), quiet=True)
        return self.import_limit

    def new_upload(self) -> Path:
        """A fresh private file (0600, in a 0700 directory of the service's) to spool an upload into."""
        self.core.home.uploads.mkdir(mode=0o700, exist_ok=True)
        self.core.home.uploads.chmod(0o700)
        fd, name = tempfile.mkstemp(dir=self.core.home.uploads, prefix="import-", suffix=".dump")
        os.close(fd)
        return Path(name)

    def clear_uploads(self) -> list[str]:
        """Remove uploads a stopped service left behind (at start, before any import can run)."""
        gone = []
        if self.core.home.uploads.is_dir():
            for p in self.core.home.uploads.iterdir():
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return gone

    def import_dump(self, path: str | os.PathLike[str], branch: str = "production",
                    dbname: str = "postgres") -> dict[str, Any]:
        """Restore a pg_dump output of the caller's (plain SQL, -Fc, -Ft, or a -Fd directory) into a branch."""
        src = Path(path)
        if src.is_dir():
            upload = self.new_upload()
            try:
                with open(upload, "wb") as fh:
                    directory_script(src, fh)
                return self.import_upload(upload, branch, dbname)
            finally:
                upload.unlink(missing_ok=True)
        if not src.is_file():
            raise InvalidInput(f"dump file {str(path)!r} does not exist", "Give the path of a pg_dump output")
        return self.import_upload(src, branch, dbname)

    def import_upload(self, upload: Path, branch: str, dbname: str = "postgres") -> dict[str, Any]:
        """Restore a dump the service holds (checked first: nothing runs if it is refused)."""
        check_database(dbname)
        with self.core.act(Action.BRANCH_IMPORT, self.core.subject(branch)) as rec:
            size = upload.stat().st_size
            if size > self.import_limit:
                raise too_large(self.import_limit)
            self.core.branches.start(branch)
            t0 = time.perf_counter()
            # as the branch owner's role, never the superuser (the provider's restore)
            fmt = self.core.provider.restore(self.core.store.get(branch).port, upload, dbname)
            rec.after = out = {"branch": branch, "database": dbname, "format": fmt, "bytes": size,
                               "seconds": round(time.perf_counter() - t0, 2)}
        return out
