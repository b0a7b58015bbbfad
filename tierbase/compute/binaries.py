"""Finding the PostgreSQL server binaries and the OS user computes run as."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import BinariesNotFound, ComputeError
from ..provider.types import ComputeUser
from ..settings import from_env, value

NEEDED = ("initdb", "postgres", "pg_ctl", "pg_basebackup", "pg_controldata", "pg_restore", "pg_dump", "psql")


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    major: int

    def __getitem__(self, tool: str) -> str:
        return str(self.bindir / tool)


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = from_env("pg_bindir")
    if env:
        return [Path(env)]  # an explicit choice is never second-guessed
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            got = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if got.returncode == 0 and got.stdout.strip():
                out.append(Path(got.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    on_path = shutil.which("postgres")
    if on_path:
        out.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted((p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
        out.extend(v / "bin" for v in versions)
    return out


@cache
def find_binaries() -> PgBinaries:
    """Locate a bindir holding every server tool tierbase needs."""
    tried = _candidates()
    for bindir in tried:
        if all((bindir / tool).is_file() and os.access(bindir / tool, os.X_OK) for tool in NEEDED):
            got = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
            digits = got.stdout.strip().split()[-1].split(".")[0]
            return PgBinaries(bindir=bindir, major=int(digits) if digits.isdigit() else 0)
    where = ", ".join(str(p) for p in tried) or "nowhere (no pg_config, no postgres on PATH, no /usr/lib/postgresql)"
    raise BinariesNotFound(
        f"PostgreSQL server binaries ({', '.join(NEEDED)}) were not found; looked in {where}",
        "Install them (Debian: `apt-get install postgresql`) or set TIERBASE_PG_BINDIR to their directory",
    )


@cache
def compute_user() -> ComputeUser:
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return ComputeUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    name = str(value("compute_user"))
    try:
        entry = pwd.getpwnam(name)
    except KeyError as err:
        raise ComputeError(
            f"tierbase runs as root and postgres refuses root, but the compute user {name!r} does not exist",
            "Create it (`useradd --system postgres`, or install Debian's postgresql package) "
            "or set TIERBASE_COMPUTE_USER to an existing unprivileged user",
        ) from err
    if entry.pw_uid == 0:
        raise ComputeError(f"compute user {name!r} is root", "Set TIERBASE_COMPUTE_USER to an unprivileged user")
    return ComputeUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
