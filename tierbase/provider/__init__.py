"""The provider boundary between the control plane and the substrate (storage/, compute/).

Everything above this package (control/, governance/, migrate/, workflow/, the facade, the service,
api/, cli/) reaches storage and computes only through what this package exports: the ``Provider``
protocol and its value types, the providers, and the few local facts the platform's own start-up
needs (the compute user, the postgres binaries, port ranges). tests/test_layers.py holds the rule.

The providers and the helpers that import psycopg are resolved on first use, so that importing the
package (the CLI does, through ``home``) stays cheap and compute/ can use the value types.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .locks import branch_lock
from .protocol import Provider
from .types import (
    DIRECT_GROUP,
    OWNER_ROLE,
    PLATFORM_ROLES,
    PLATFORM_SLOTS,
    READER_ROLE,
    SUPERUSER,
    ComputeUser,
    Endpoint,
    ForkPoint,
    Health,
)

if TYPE_CHECKING:
    from ..compute.binaries import PgBinaries, compute_user, find_binaries
    from ..compute.ports import (
        API_PORT,
        COMPUTE_PORTS,
        PORT_BASE,
        PROXY_PORT,
        Ports,
        check_base,
        check_port,
        default_ports,
        ephemeral_range,
    )
    from ..compute.restore import DATABASE_NAME, directory_script
    from ..storage.btrfs import DEFAULT_IMAGE_SIZE, parse_size
    from .fake import FakeProvider
    from .local import LocalProvider, make_driver

#: name -> module it lives in (below the boundary or in this package), imported on first use
_LAZY = {
    "LocalProvider": ".local", "make_driver": ".local", "FakeProvider": ".fake",
    "PgBinaries": "..compute.binaries", "compute_user": "..compute.binaries", "find_binaries": "..compute.binaries",
    "API_PORT": "..compute.ports", "COMPUTE_PORTS": "..compute.ports", "PORT_BASE": "..compute.ports",
    "PROXY_PORT": "..compute.ports", "Ports": "..compute.ports", "check_base": "..compute.ports",
    "check_port": "..compute.ports", "default_ports": "..compute.ports", "ephemeral_range": "..compute.ports",
    "DATABASE_NAME": "..compute.restore", "directory_script": "..compute.restore",
    "DEFAULT_IMAGE_SIZE": "..storage.btrfs", "parse_size": "..storage.btrfs",
}

__all__ = ["API_PORT", "COMPUTE_PORTS", "DATABASE_NAME", "DEFAULT_IMAGE_SIZE", "DIRECT_GROUP", "OWNER_ROLE",
           "PLATFORM_ROLES", "PLATFORM_SLOTS", "PORT_BASE", "PROXY_PORT", "READER_ROLE", "SUPERUSER", "ComputeUser",
           "Endpoint",
           "FakeProvider", "ForkPoint", "Health", "LocalProvider", "PgBinaries", "Ports", "Provider", "branch_lock",
           "check_base", "check_port", "compute_user", "default_ports", "directory_script", "ephemeral_range",
           "find_binaries", "make_driver", "parse_size"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tierbase.provider' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
