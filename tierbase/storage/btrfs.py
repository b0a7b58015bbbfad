"""btrfs driver: each volume is a subvolume; clone is an atomic snapshot (O(1)).

When the volume root is not on btrfs and we are root, a sparse image file is
formatted and loop-mounted there with ``user_subvol_rm_allowed`` (so that a
non-root owner may delete subvolumes it snapshotted).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import struct
from pathlib import Path

from ..errors import DiskFull, StorageError
from ..provider.types import ComputeUser
from ..settings import default
from . import quota
from .base import Source, VolumeDriver, run_tool

DEFAULT_IMAGE_SIZE: str = default("btrfs_size")

#: _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2): the call `btrfs subvolume snapshot` makes
_IOC_SNAP_CREATE_V2 = (1 << 30) | (4096 << 16) | (0x94 << 8) | 23
_SUBVOL_RDONLY = 1 << 1
_SUBVOL_QGROUP_INHERIT = 1 << 2
_SUBVOL_NAME_MAX = 4039


def fs_type(path: Path) -> str:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return run_tool(["stat", "-f", "-c", "%T", str(probe)], what="checking the filesystem", where=probe).strip()


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == target for line in fh)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise StorageError(f"size {text!r} does not parse", "Give a size such as 512M, 20G or 1T")
    return int(m.group(1)) * int(1024 ** "_kmgt".index(m.group(2) or "_"))


class BtrfsDriver(VolumeDriver):
    name = "btrfs"
    copy_on_write = True

    def __init__(self, root: Path, user: ComputeUser, *, image: Path | None = None,
                 image_size: str = DEFAULT_IMAGE_SIZE) -> None:
        super().__init__(root, user)
        self.image = image
        self.image_size = image_size

    @staticmethod
    def usable(root: Path) -> bool:
        """btrfs works here: the root is on btrfs, or we may make a loop-mounted image."""
        if shutil.which("btrfs") is None:
            return False
        if fs_type(root) == "btrfs":
            return True
        return os.geteuid() == 0 and shutil.which("mkfs.btrfs") is not None

    def prepare(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        if fs_type(self.root) == "btrfs":
            self._own_dir(self.root)  # the unprivileged service makes and deletes subvolumes here
            return []
        if self.image is None:
            raise StorageError(f"{self.root} is not on btrfs", "Use --storage copy, or run as root to loop-mount one")
        if os.geteuid() != 0:
            raise StorageError(f"{self.root} is not on btrfs and loop-mounting an image needs root",
                               "Run `tierbase up` as root, put TIERBASE_HOME on btrfs, or use --storage copy")
        said: list[str] = []
        if not self.image.exists():
            size = parse_size(self.image_size)
            free = shutil.disk_usage(self.image.parent).free
            if free < min(size, 256 * 1024 ** 2):
                raise StorageError(f"only {free // 1024 ** 2} MiB free for the btrfs image at {self.image}",
                                   "Free space, or pass a smaller --btrfs-size")
            # root's alone: whoever may write the image of a mounted filesystem can corrupt it under the kernel
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.truncate(size)
            try:
                run_tool(["mkfs.btrfs", "-q", "-f", str(self.image)], what="mkfs.btrfs", where=self.image)
            except StorageError:
                self.image.unlink(missing_ok=True)
                raise
            said.append(f"created a sparse {self.image_size} btrfs image at {self.image}")
        run_tool(["mount", "-o", "loop,user_subvol_rm_allowed,noatime", str(self.image), str(self.root)],
                 what="loop-mounting the btrfs image", where=self.root)
        self._own_dir(self.root)  # the unprivileged service snapshots and deletes subvolumes here
        said.append(f"loop-mounted it at {self.root} (user_subvol_rm_allowed)")
        return said

    def release(self, purge: bool) -> list[str]:
        said = super().release(purge)
        if self.image is not None and self.root.exists() and is_mounted(self.root):
            run_tool(["umount", str(self.root)], what="unmounting the btrfs image", where=self.root)
            said.append(f"unmounted {self.root}")
        if self.image is not None and self.image.exists():
            # mount -o loop sets autoclear, but a loop device can outlive a failed umount: detach leftovers.
            listed = run_tool(["losetup", "-j", str(self.image)], what="listing loop devices", where=self.image)
            for line in listed.splitlines():
                dev = line.split(":", 1)[0]
                run_tool(["losetup", "-d", dev], what=f"detaching {dev}", where=self.image)
                said.append(f"detached {dev}")
            if purge:
                self.image.unlink()
                said.append(f"removed {self.image}")
        return said

    def volumes(self) -> list[str]:
        return [v for v in super().volumes() if (self.root / v).is_dir()]

    def create(self, volume: str) -> Path:
        path = self.path(volume)
        run_tool(["btrfs", "subvolume", "create", str(path)], what="creating a subvolume", where=path)
        self._own_dir(path)
        return path

    def clone(self, source: Source, volume: str, *, readonly: bool = False, limited: bool = False) -> Path:
        path = self.path(volume)
        # limited: a feature's volume goes into the features quota group (quota.py), so that its writes
        # count against the features' limit and a full feature is never production's problem
        group = quota.FEATURES_QGROUP if limited and quota.group_exists(self.root) else None
        snapshot(self.path(source.volume), path, readonly=readonly, qgroup=group)
        return path

    def delete(self, volume: str) -> None:
        path = self.path(volume)
        if not path.exists():
            return
        if os.geteuid() != 0:
            # without root, a read-only snapshot must be made writable before it may be removed
            run_tool(["btrfs", "property", "set", "-ts", str(path), "ro", "false"], what="unlocking a snapshot",
                     where=path)
        # --commit-after: the space comes back within about a second instead of at the next periodic commit
        run_tool(["btrfs", "subvolume", "delete", "-c", str(path)], what="deleting a subvolume", where=path)

    def own_bytes(self, volume: str) -> int:
        out = run_tool(["btrfs", "filesystem", "du", "-s", "--raw", str(self.path(volume))],
                       what="measuring a subvolume", where=self.path(volume), timeout=120)
        # columns: Total Exclusive Set-shared Filename
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
        return 0


def snapshot(src: Path, dst: Path, *, readonly: bool = False, qgroup: str | None = None) -> None:
    """``btrfs subvolume snapshot [-r] [-i QGROUP] SRC DST`` as the one ioctl the command makes.

    Starting btrfs-progs (fork, exec, its own start-up) was about half of what the service spends on a
    branch creation; the snapshot itself is the same call. ``qgroup`` ("level/id") is the group the new
    subvolume joins, as ``-i`` gives it (the features' quota group).
    """
    name = dst.name.encode()
    if not 0 < len(name) <= _SUBVOL_NAME_MAX or b"/" in name:
        raise StorageError(f"{dst.name!r} cannot name a subvolume", "Use a volume name of 1-4039 bytes without '/'")
    flags = _SUBVOL_RDONLY if readonly else 0
    inherit = None
    if qgroup is not None:
        level, _, ident = qgroup.partition("/")
        # struct btrfs_qgroup_inherit: flags, num_qgroups, num_ref_copies, num_excl_copies, a limit (5 u64,
        # unused here), then the qgroup ids ((level << 48) | id)
        inherit = ctypes.create_string_buffer(struct.pack("=4Q5QQ", 0, 1, 0, 0, 0, 0, 0, 0, 0,
                                                          (int(level) << 48) | int(ident)), 80)
        flags |= _SUBVOL_QGROUP_INHERIT
    what = "snapshotting a subvolume"
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dst_fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                # struct btrfs_ioctl_vol_args_v2: fd, transid, flags, {size, qgroup_inherit *} padded to
                # 4 u64, then the new subvolume's name (4040 bytes): 4096 bytes in all
                args = struct.pack("=qQQQQ16x", src_fd, 0, flags, 80 if inherit is not None else 0,
                                   ctypes.addressof(inherit) if inherit is not None else 0)
                fcntl.ioctl(dst_fd, _IOC_SNAP_CREATE_V2, bytearray(args + name.ljust(_SUBVOL_NAME_MAX + 1, b"\0")))
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device holding {dst} ({what}: {err.strerror})",
                           "Free space there, or give tierbase more room (`tierbase up --btrfs-size`)") from err
        raise StorageError(f"{what} failed: cannot snapshot {str(src)!r} into {str(dst)!r}: {err.strerror}",
                           "See the message above") from err

