"""btrfs simple quotas for the features' quota group: the part of disk-full isolation that touches btrfs.

Why simple quotas ("squota", Linux 6.7+) and not full qgroups: a snapshot added to a parent qgroup
that its source is not in marks full qgroups inconsistent, and then nothing is counted or enforced
until a rescan (measured: a branch wrote 400 MiB past a 300 MiB limit). Simple quotas charge each
extent to the subvolume that wrote it, so a fresh snapshot owns nothing, its own writes count at
once, and a limit on the group holds (bench/space.py measures the cost).

Who does what: root enables quotas, makes the group and sets its limit (``tierbase up``, the only
privileged step); the unprivileged service only snapshots writable non-tier branches *into* the
group (``btrfs subvolume snapshot -i``, which needs no privilege) and reads the group's usage from
sysfs. btrfs-progs 6.2 cannot enable simple quotas, hence the one ioctl here.
"""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError
from .base import run_tool

#: the qgroup every feature branch's subvolume is created in (level 1, id 100)
FEATURES_QGROUP = "1/100"

_IOC_FS_INFO = (2 << 30) | (1024 << 16) | (0x94 << 8) | 31  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
_IOC_QUOTA_CTL = (3 << 30) | (16 << 16) | (0x94 << 8) | 40  # _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args)
_QUOTA_CTL_ENABLE_SIMPLE = 4


@dataclass(frozen=True)
class GroupUsage:
    used: int
    #: the group's exclusive-bytes limit (None: no limit)
    limit: int | None


def fsid(root: Path) -> str:
    """The filesystem's UUID (names its /sys/fs/btrfs directory); needs no privilege."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(1024)
        fcntl.ioctl(fd, _IOC_FS_INFO, buf)
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(buf[16:32])))


def _sysfs(root: Path) -> Path:
    return Path("/sys/fs/btrfs") / fsid(root) / "qgroups"


def mode(root: Path) -> str | None:
    """'squota' (simple), 'qgroup' (full) or None when quotas are off."""
    try:
        return (_sysfs(root) / "mode").read_text().strip()
    except OSError:
        return None


def group_exists(root: Path) -> bool:
    try:
        return (_sysfs(root) / FEATURES_QGROUP.replace("/", "_")).is_dir()
    except OSError:
        return False


def usage(root: Path) -> GroupUsage | None:
    """The features group's exclusive bytes and limit, from sysfs (world-readable); None without it."""
    try:
        d = _sysfs(root) / FEATURES_QGROUP.replace("/", "_")
        used = int((d / "exclusive").read_text())
        flags = int((d / "limit_flags").read_text())
        limit = int((d / "max_exclusive").read_text())
    except (OSError, ValueError):
        return None
    return GroupUsage(used, limit if flags & 0x2 else None)  # BTRFS_QGROUP_LIMIT_MAX_EXCL


def enable(root: Path) -> list[str]:
    """Root only: simple quotas on, the features group made. Returns what was done."""
    said: list[str] = []
    current = mode(root)
    if current is None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, _IOC_QUOTA_CTL, bytearray(struct.pack("QQ", _QUOTA_CTL_ENABLE_SIMPLE, 0)))
        except OSError as err:
            raise StorageError(f"btrfs simple quotas could not be enabled on {root}: {err.strerror}",
                               "They need Linux 6.7 or later; without them feature branches are not limited") from err
        finally:
            os.close(fd)
        said.append("enabled btrfs simple quotas")
    elif current != "squota":
        raise StorageError(f"{root} has full btrfs qgroups enabled, which stop counting once a branch is "
                           "snapshotted into the features group", "Disable them (`btrfs quota disable`) and run "
                           "`tierbase up` again to use simple quotas")
    if not group_exists(root):
        run_tool(["btrfs", "qgroup", "create", FEATURES_QGROUP, str(root)], what="creating the features qgroup",
                 where=root)
        said.append(f"created the features quota group {FEATURES_QGROUP}")
    return said


def set_limit(root: Path, limit: int) -> None:
    """Root only: feature branches together may hold at most ``limit`` bytes of their own."""
    run_tool(["btrfs", "qgroup", "limit", "-e", str(max(limit, 1024 ** 2)), FEATURES_QGROUP, str(root)],
             what="limiting the features qgroup", where=root)
