"""Volume drivers: btrfs (copy-on-write), copy (portable), fake (unit tests only)."""

from __future__ import annotations

from pathlib import Path

from ..compute import Postgres
from ..errors import InvalidInput, StorageError
from .base import Source, VolumeDriver
from .btrfs import DEFAULT_IMAGE_SIZE, BtrfsDriver, fs_type
from .copy import CopyDriver

DRIVERS = ("auto", "btrfs", "copy")


def choose_driver(kind: str) -> str:
    if kind not in DRIVERS:
        raise InvalidInput(f"storage driver {kind!r} is unknown", f"Use one of: {', '.join(DRIVERS)}")
    return kind


def make_driver(kind: str, home: Path, pg: Postgres, *, image_size: str = DEFAULT_IMAGE_SIZE) -> VolumeDriver:
    """Build the driver named ``kind``; ``auto`` picks btrfs whenever it can work here."""
    root = home / "volumes"
    kind = choose_driver(kind)
    if kind == "auto":
        kind = "btrfs" if BtrfsDriver.usable(root) else "copy"
    if kind == "copy":
        return CopyDriver(root, pg)
    if not BtrfsDriver.usable(root):
        raise StorageError("the btrfs driver cannot work here: the data dir is not on btrfs and tierbase is not "
                           "root (or btrfs-progs is missing)",
                           "Install btrfs-progs and run as root, put TIERBASE_HOME on btrfs, or use --storage copy")
    on_btrfs = fs_type(root) == "btrfs" and not (home / "btrfs.img").exists()
    return BtrfsDriver(root, pg.user, image=None if on_btrfs else home / "btrfs.img", image_size=image_size)


__all__ = ["DEFAULT_IMAGE_SIZE", "DRIVERS", "BtrfsDriver", "CopyDriver", "Source", "VolumeDriver", "make_driver"]
