"""Migration files on disk: ``V0003__split_inventory_code.sql`` plus an optional ``U0003__...sql`` undo.

Also the migration error classes (one place, so every module of ``tierbase.migrate`` raises the
same ones): each carries a message, a hint and the data an agent needs to act.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Refused, TierbaseError

NO_TRANSACTION_MARKER = "-- tierbase:no-transaction"
MAX_VERSION = 2**31 - 1  # the ledger's version column is an int
_FILE = re.compile(r"^(?P<kind>[VU])(?P<version>\d+)__(?P<name>[A-Za-z0-9_-]+)\.sql$")
# a .sql file that looks like it means to be a migration but is misnamed (v1_x.sql, V1-x.sql, U3.sql)
_LOOKS_LIKE = re.compile(r"^([VvUu]\d|[VU][^a-z].*__)")
_NEW_NAME = re.compile(r"^[a-z0-9_]+$")


# -- errors -------------------------------------------------------------------------------------------
class MigrationError(TierbaseError):
    """Migration files or a migration request are not usable as they are."""

    code = "migration_error"


class MissingUndo(MigrationError):
    code = "missing_undo"


class LintUnavailable(MigrationError):
    code = "squawk_not_found"


class MigrationFailed(TierbaseError):
    """Postgres rejected a migration; data says which file, line, error and SQLSTATE."""

    code = "migration_failed"
    http_status = 422


class MigrationDrift(Refused):
    """An applied migration's file was edited afterwards: applying anything is refused."""

    code = "migration_drift"
    http_status = 409


class MigrationBusy(Refused):
    code = "migration_busy"
    http_status = 409


class LintBlocked(Refused):
    code = "lint_blocked"


class VerifyFailed(Refused):
    code = "verify_failed"


# -- files --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str
    checksum: str
    transactional: bool
    undo_path: Path | None = None
    undo_sql: str | None = None

    def label(self) -> str:
        return f"V{self.version:04d}__{self.name}"

    def undo_label(self) -> str:
        return f"U{self.version:04d}__{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "name": self.name, "label": self.label(), "file": str(self.path),
            "checksum": self.checksum, "transactional": self.transactional,
            "undo_file": str(self.undo_path) if self.undo_path else None,
        }


def is_transactional(sql: str) -> bool:
    """False when a line of the file is exactly the no-transaction marker."""
    return not any(line.strip().lower() == NO_TRANSACTION_MARKER for line in sql.splitlines())


def checksum(raw: bytes) -> str:
    """sha256 of the file with CRLF normalised to LF, so a checkout on Windows is not drift."""
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def _read(path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    try:
        text = raw.replace(b"\r\n", b"\n").decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MigrationError(f"migration file {path} is not UTF-8 ({err.reason} at byte {err.start})",
                             "Save it as UTF-8", file=str(path)) from err
    return text, checksum(raw)


def discover(directory: Path) -> list[Migration]:
    """Every migration in ``directory``, ordered by version; refuses an ambiguous or misnamed set."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MigrationError(
            f"migration directory {directory} does not exist",
            "Create the first migration with `tierbase migrate new NAME` (it creates the directory), "
            "or set the migration dir in tierbase.toml",
            directory=str(directory),
        )
    ups: dict[int, list[Path]] = {}
    undos: dict[int, list[Path]] = {}
    bad: list[str] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".sql":
            continue  # README.md, seeds/, ...
        match = _FILE.match(path.name)
        if match is None:
            if _LOOKS_LIKE.match(path.name):
                bad.append(path.name)
            continue
        version = int(match["version"])
        (ups if match["kind"] == "V" else undos).setdefault(version, []).append(path)
    if bad:
        raise MigrationError(
            f"misnamed migration file(s) in {directory}: {', '.join(bad)}",
            "Name migrations V<digits>__<name>.sql and undo files U<digits>__<name>.sql "
            "(e.g. V0003__split_inventory_code.sql), or move other .sql files out of the directory",
            directory=str(directory), files=bad,
        )
    _refuse_duplicates(directory, ups, "migration")
    _refuse_duplicates(directory, undos, "undo")
    too_big = [p.name for v, ps in ups.items() if v > MAX_VERSION for p in ps]
    if too_big:
        raise MigrationError(f"migration version too large in {', '.join(too_big)} (max {MAX_VERSION})",
                             "Renumber the file with a smaller version", files=too_big)
    orphans = [ps[0].name for v, ps in undos.items() if v not in ups]
    if orphans:
        raise MigrationError(
            f"undo file(s) without a migration in {directory}: {', '.join(sorted(orphans))}",
            "Each U<version>__<name>.sql undoes the V file of the same version and name: "
            "rename it to match its migration, or delete it",
            directory=str(directory), files=sorted(orphans),
        )
    return [_load(ups[v][0], undos.get(v, [None])[0]) for v in sorted(ups)]


def _refuse_duplicates(directory: Path, found: dict[int, list[Path]], what: str) -> None:
    clashes = {v: ps for v, ps in found.items() if len(ps) > 1}
    if not clashes:
        return
    names = [", ".join(p.name for p in ps) for _, ps in sorted(clashes.items())]
    raise MigrationError(
        f"two {what} files with one version in {directory}: {'; '.join(names)}",
        "Each version must be unique: renumber one of them (`tierbase migrate new NAME` picks the next free "
        "number) — if one of them is already applied on a tier, renumber the other",
        directory=str(directory), versions=sorted(clashes), files=[[p.name for p in ps] for ps in clashes.values()],
    )


def _load(path: Path, undo_path: Path | None) -> Migration:
    match = _FILE.match(path.name)
    assert match is not None  # discover only passes matching names
    sql, digest = _read(path)
    undo_sql = None
    if undo_path is not None:
        undo_match = _FILE.match(undo_path.name)
        if undo_match is None or undo_match["name"] != match["name"]:
            raise MigrationError(
                f"undo file {undo_path.name} does not match its migration {path.name}",
                f"Rename it to U{match['version']}__{match['name']}.sql",
                files=[path.name, undo_path.name],
            )
        undo_sql, _ = _read(undo_path)
    return Migration(version=int(match["version"]), name=match["name"], path=path, sql=sql, checksum=digest,
                     transactional=is_transactional(sql), undo_path=undo_path, undo_sql=undo_sql)


_TEMPLATE = """\
-- {label}: describe the change here.
--
-- tierbase runs this file in ONE transaction together with its ledger row, with
-- statement_timeout and lock_timeout set: if any statement fails, nothing of it stays.
-- Prefer expand-then-contract: add new columns/tables first, backfill, drop old ones later.
-- Statements that cannot run in a transaction (CREATE INDEX CONCURRENTLY) go in a file
-- of their own that has this marker on a line by itself: -- tierbase:no-transaction

"""

_UNDO_TEMPLATE = """\
-- {label}: undoes {up}. `tierbase migrate verify` checks that up -> undo -> up
-- leaves the same schema, and that undo restores the schema from before {up}.

"""


def new_migration(directory: Path, name: str, with_undo: bool = False) -> list[Path]:
    """Write the next migration file (and its undo file); returns the paths written."""
    if not _NEW_NAME.match(name):
        raise MigrationError(
            f"migration name {name!r} is not valid",
            "Use lower-case letters, digits and underscores, e.g. split_inventory_code",
            name=name,
        )
    directory = Path(directory)
    existing = discover(directory) if directory.is_dir() else []
    version = max((m.version for m in existing), default=0) + 1
    up = directory / f"V{version:04d}__{name}.sql"
    paths = [up]
    directory.mkdir(parents=True, exist_ok=True)
    up.write_text(_TEMPLATE.format(label=up.stem))
    if with_undo:
        undo = directory / f"U{version:04d}__{name}.sql"
        undo.write_text(_UNDO_TEMPLATE.format(label=undo.stem, up=up.stem))
        paths.append(undo)
    return paths
