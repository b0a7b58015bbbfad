"""The volume-driver interface: one data directory per volume.

Small on purpose, so that a ZFS or XFS-reflink driver is one more module.
The layer above never builds volume paths itself; it asks the driver.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiskFull, StorageError
from ..provider.types import ComputeUser, Endpoint


@dataclass(frozen=True)
class Source:
    """What a driver may need to know about the volume it copies from."""

    volume: str
    #: set when the source cluster is running (a copy driver then copies online)
    endpoint: Endpoint | None = None


class VolumeDriver(ABC):
    name: str = "abstract"
    #: True when clone() is O(1) copy-on-write; False when it copies every byte.
    copy_on_write: bool = False

    def __init__(self, root: Path, user: ComputeUser) -> None:
        self.root = root
        self.user = user

    # -- lifecycle of the driver itself --------------------------------------
    def prepare(self) -> list[str]:
        """Make the volume root usable; return what was done, for the user to read."""
        self.root.mkdir(parents=True, exist_ok=True)
        return []

    def release(self, purge: bool) -> list[str]:
        """Undo prepare(): unmount, detach; with purge, delete every volume."""
        if purge and self.root.exists():
            for vol in self.volumes():
                self.delete(vol)
        return []

    # -- volumes -------------------------------------------------------------
    def path(self, volume: str) -> Path:
        return self.root / volume

    def exists(self, volume: str) -> bool:
        return self.path(volume).exists()

    def volumes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # dot-names are the platform's own trees on the pool (.pitr: WAL archives, base snapshots)
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(("lost+found", ".")))

    @abstractmethod
    def create(self, volume: str) -> Path:
        """An empty directory owned by the compute user, mode 0700."""

    @abstractmethod
    def clone(self, source: Source, volume: str, *, readonly: bool = False, limited: bool = False) -> Path:
        """A copy of ``source`` as it is now (crash-consistent if it is running).

        ``limited``: the copy is a feature's, whose own writes count against the features' space limit
        (drivers without quotas ignore it)."""

    @abstractmethod
    def delete(self, volume: str) -> None:
        """Remove a volume; a missing one is not an error."""

    @abstractmethod
    def own_bytes(self, volume: str) -> int:
        """Bytes this volume holds that no other volume shares."""

    # -- helpers for drivers ---------------------------------------------------
    def _own_dir(self, path: Path) -> None:
        self.user.chown(path)
        path.chmod(0o700)


def run_tool(args: list[str], *, what: str, where: Path, timeout: float = 600,
             **kwargs: object) -> str:
    try:
        got = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as err:
        raise StorageError(f"{what} needs {args[0]!r}, which is not installed",
                           "Install it (Debian: `apt-get install btrfs-progs`)") from err
    except subprocess.TimeoutExpired as err:
        raise StorageError(f"{what} did not finish within {timeout:.0f}s", "Check the machine's load") from err
    if got.returncode != 0:
        text = (got.stderr or got.stdout).strip()
        if "No space left" in text or "ENOSPC" in text:
            raise DiskFull(f"no space left on the device holding {where} ({what})",
                           "Free space there, or give tierbase more room (`tierbase up --btrfs-size`)")
        raise StorageError(f"{what} failed: {text[-600:]}", "See the message above")
    return str(got.stdout)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a stopped cluster preserving owners and modes (reflinks where the fs has them)."""
    try:
        run_tool(["cp", "-a", "--reflink=auto", str(src), str(dst)], what="copying a volume", where=dst)
    except StorageError:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno == errno.EACCES:
            raise StorageError(f"cannot remove {path}: permission denied",
                               "Run tierbase as the user that created the data dir") from err
        raise
