"""The platform's own lifecycle: `up` (make or re-open a data dir), `down`, reconcile, status, space.

``Platform`` takes the core and the services whose state start-up finishes or reports: governance
(`up --config` loads a tierbase.toml), migrations and rollbacks (reconcile of dead promotions and
rollbacks), time travel (archiving that fails shows in `status`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .app_base import Core, port_base
from .app_governance import Governance
from .app_migrate import Migrations
from .app_pitr import Pitr
from .app_rollback import Rollbacks
from .control import space as spacectl
from .control.branches import Branches
from .control.store import Store
from .errors import InvalidInput, NotRunning, Refused
from .governance.config import load_config
from .governance.gate import os_principal_name
from .governance.principals import new_token
from .home import Home
from .provider import (
    COMPUTE_PORTS,
    DEFAULT_IMAGE_SIZE,
    ComputeUser,
    LocalProvider,
    Ports,
    Provider,
    check_base,
    check_port,
    compute_user,
    default_ports,
    ephemeral_range,
    find_binaries,
    parse_size,
)

ROOT_BRANCH = "production"


class Platform:
    def __init__(self, core: Core, *, governance: Governance, migrations: Migrations, rollbacks: Rollbacks,
                 pitr: Pitr) -> None:
        self.core = core
        self.governance = governance
        self.migrations = migrations
        self.rollbacks = rollbacks
        self.pitr = pitr

    @property
    def home(self) -> Home:
        return self.core.home

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def provider(self) -> Provider:
        return self.core.provider

    @property
    def branches(self) -> Branches:
        return self.core.branches

    # -- platform lifecycle ----------------------------------------------------
    def init(self, storage: str = "auto", btrfs_size: str = DEFAULT_IMAGE_SIZE, *,
             api_port: int | None = None, proxy_port: int | None = None, config: str | None = None,
             space_reserve: str | None = None) -> list[str]:
        """Create (or re-open) the platform: storage ready, root branch present, leftovers reconciled,
        and the tiers of ``config`` (a tierbase.toml) created. ``space_reserve``: pool space kept for
        tiers (control/space.py)."""
        said: list[str] = []
        if self.core.wires.local:
            find_binaries()  # fail before touching anything if postgres is missing
        parse_size(btrfs_size)
        reserve = parse_size(space_reserve) if space_reserve else None
        cfg = load_config(config) if config else None  # a bad config changes nothing
        ports = default_ports()
        if api_port is not None:
            check_port(api_port, "the API port", f"--api-port {ports.api}")
        if proxy_port is not None:
            check_port(proxy_port, "the proxy port", f"--proxy-port {ports.proxy}")
        user = compute_user() if self.core.wires.local else ComputeUser.current()
        fresh = not self.home.exists()
        if fresh:
            check_base(port_base())
        if fresh and self.home.root.exists() and any(self.home.root.iterdir()) and not self.home.owned():
            raise InvalidInput(f"{self.home.root} is not empty and is not a tierbase data dir",
                               "Choose an empty or new directory for TIERBASE_HOME")
        existed = set(self.home.root.iterdir()) if self.home.root.exists() else None
        self.home.make(user)
        if fresh:
            self.home.write_marker()
            provider = LocalProvider.open(self.home.root, storage, image_size=btrfs_size) if self.core.wires.local \
                else self.provider
            try:
                said += provider.prepare()
                self.home.private_file(self.home.db, user)
                self.core.wires.open_store()
                self.store.set_setting("driver", provider.name)
                self.store.set_setting("btrfs_size", btrfs_size)
                self.store.set_setting("port_base", port_base())
                self.store.set_setting("api_port", api_port or ports.api)
                self.store.set_setting("proxy_port", proxy_port or ports.proxy)
                self.core.wires.use_provider(provider)
                owner = os_principal_name()
                self.store.set_setting("owner", owner)
                token = new_token()
                self.core.gate.principals.create(owner, "platform-engineer", created_by=owner, token=token)
                self.home.write_secret(self.home.token, token)
                self.branches.create_root(ROOT_BRANCH, creator=owner)
            except BaseException:
                self.core.wires.close()
                provider.release(purge=True)
                _remove_made(self.home.root, existed)  # only what this first `up` made
                raise
            said.append(f"created the root branch {ROOT_BRANCH!r} with initdb (storage driver: {provider.name})")
        else:
            stored = self.store.get_setting("driver")
            if storage not in ("auto", stored) and self.core.wires.local:
                raise InvalidInput(f"this data dir uses the {stored!r} storage driver, not {storage!r}",
                                   "Use `tierbase down --purge` first to start over with another driver")
            for key, value in (("api_port", api_port), ("proxy_port", proxy_port)):
                if value:
                    self.store.set_setting(key, value)
            if not self.home.owned():  # made by a tierbase from before the marker: its meta.db says so
                self.home.write_marker()
            said += self._move_ports_out_of_ephemeral_range(ports)
            said += self.provider.prepare()
            said += self.reconcile()
        if reserve is not None:
            self.store.set_setting("space_reserve", reserve)
        said += spacectl.isolate(self.provider, self.store)  # root only: the features' share of the pool
        if cfg is not None:
            said += self.governance.reload_config(config)["said"]
        return said

    # -- pool space (control/space.py) -------------------------------------------
    def space(self) -> dict[str, Any]:
        """The pool's free space, the reserve kept for tiers, the features' limit, and a warning if low."""
        return spacectl.measure(self.provider, self.store).to_dict()

    def _move_ports_out_of_ephemeral_range(self, ports: Ports) -> list[str]:
        """A data dir made before ports left the ephemeral range: new computes get ports below it."""
        said, eph = [], ephemeral_range()
        base = int(self.store.get_setting("port_base", ports.base))
        if min(base + COMPUTE_PORTS - 1, 65535) >= eph[0] and base <= eph[1]:
            self.store.set_setting("port_base", ports.base)
            said.append(f"compute ports from {base} reached into the kernel's ephemeral port range "
                        f"{eph[0]}-{eph[1]}: new computes get ports from {ports.base} (existing ones keep theirs)")
        core = self.core
        for what, option, port in (("API", "--api-port", core.api_port), ("proxy", "--proxy-port", core.proxy_port)):
            if eph[0] <= port <= eph[1]:
                said.append(f"warning: the {what} port {port} lies in the kernel's ephemeral port range "
                            f"{eph[0]}-{eph[1]}; move it with `tierbase up {option} N` (N below {eph[0]})")
        return said

    def down(self, purge: bool = False) -> list[str]:
        """Stop every compute; unmount; with purge, remove every byte of the data dir (only one tierbase made)."""
        if purge and self.home.root.exists() and not self.home.owned():
            raise Refused(f"{self.home.root} is not a tierbase data dir (it has no {self.home.marker.name}); "
                          "nothing was deleted", "Check TIERBASE_HOME / --home")
        if not self.home.exists():
            if purge and self.home.root.exists():
                shutil.rmtree(self.home.root, ignore_errors=True)
            return []
        said = []
        for port in self.branches.provider.pooler().stop_all():
            said.append(f"stopped the PgBouncer of the compute on port {port}")
        for b in self.store.all():
            if self.branches.provider.stop(b.name, b.volume):
                said.append(f"stopped the compute of {b.name!r}")
        provider = self.provider
        self.core.wires.close()
        said += provider.release(purge=purge)
        if purge:
            shutil.rmtree(self.home.root, ignore_errors=True)
            said.append(f"removed {self.home.root}")
        return said

    def reconcile(self) -> list[str]:
        """Finish or undo what dead processes left: branch operations, rollbacks, then promotions (audited)."""
        return self.branches.reconcile() + self.rollbacks.reconcile_rollbacks() + self.migrations.reconcile_promotions()

    def tls_ca(self) -> dict[str, Any]:
        """The CA certificate that signs the proxy's (public): clients verify the proxy with it."""
        cert = self.store.get_setting("tls_cert")
        path = Path(cert) if cert else self.home.root / "tls" / "ca.crt"
        if not path.exists():
            raise NotRunning("the proxy has no TLS certificate yet", "Start the platform with `tierbase up`")
        return {"pem": path.read_text(), "operator_supplied": bool(cert)}

    def status(self) -> dict[str, Any]:
        branches = self.store.all()
        running = sum(1 for b in branches if self.provider.running_pid(b.volume))
        health = self.provider.health()
        return {
            "home": str(self.home.root), "driver": health.driver, "copy_on_write": health.copy_on_write,
            "postgres": health.postgres, "compute_user": health.compute_user,
            "branches": len(branches), "computes_running": running, "space": self.space(),
            "warnings": self.pitr.history_warnings(),  # archiving that fails (app_pitr)
            "masked_images": self.governance.images.masked_images(),  # app_images
        }


def _remove_made(root: Path, existed: set[Path] | None) -> None:
    """Undo a failed first `up`: the whole directory if it made it, else only the entries it added."""
    if existed is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in set(root.iterdir()) - existed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)

