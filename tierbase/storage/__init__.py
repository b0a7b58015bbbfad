"""Volume drivers: btrfs (copy-on-write), copy (portable), fake (the fake provider's volumes).

The local provider (provider/local.py) picks and builds one; nothing above the provider imports this.
"""

from __future__ import annotations

from ..errors import InvalidInput
from .base import Source, VolumeDriver
from .btrfs import DEFAULT_IMAGE_SIZE, BtrfsDriver, fs_type
from .copy import CopyDriver

DRIVERS = ("auto", "btrfs", "copy")


def choose_driver(kind: str) -> str:
    if kind not in DRIVERS:
        raise InvalidInput(f"storage driver {kind!r} is unknown", f"Use one of: {', '.join(DRIVERS)}")
    return kind


__all__ = ["DEFAULT_IMAGE_SIZE", "DRIVERS", "BtrfsDriver", "CopyDriver", "Source", "VolumeDriver", "choose_driver",
           "fs_type"]
