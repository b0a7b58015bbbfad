"""The pagila "shop" platform the masking tests share: production holds pagila with SEED's rows in the
project database `shop`, a config declares what is sensitive, and principals work through the proxy.

One module-scoped platform per test file (each file declares its own tiers and rules); what differs
between files is passed in: the config, who loads the seed, what else production holds, who works.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

from tierbase import Tierbase
from tierbase.api.server import create_app

from .conftest import free_port, free_port_base, make_home, make_principal, serving, teardown_platform
from .test_masking import PAGILA, SEED

#: who works on the shop unless a file says otherwise
WORKERS = (("dev", "developer"), ("bot", "agent"))


@dataclass
class Shop:
    tb: Tierbase
    base: Path

    def admin(self, branch: str) -> str:
        """The platform's superuser on a branch's project database (unix socket)."""
        self.tb.branches.start(branch)
        return self.tb.branches.provider.endpoint(self.tb.store.get(branch).port, "shop").dsn()


@contextlib.contextmanager
def shop_platform(config: str, *, seed_as_superuser: bool = True,
                  load: Callable[[psycopg.Connection[Any]], None] | None = None,
                  principals: Sequence[tuple[str, str]] = WORKERS) -> Iterator[Shop]:
    """A platform whose production is the shop, ``config`` loaded (it makes the tiers it declares).

    ``seed_as_superuser``: the seed runs as the platform's superuser (its objects are the superuser's),
    else as a platform engineer's direct login (the owner role's); ``load``: more of production's
    contents, on the same connection after the seed."""
    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(base / "home")
    try:
        tb.init(storage="btrfs", btrfs_size="3G", proxy_port=free_port())
        tb.import_dump(str(PAGILA), "production", "shop")
        shop = Shop(tb, base)
        url = shop.admin("production") if seed_as_superuser else tb.branch_url("production", "shop", direct=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET search_path = public")
            conn.execute(SEED)
            if load is not None:
                load(conn)
        (base / "tierbase.toml").write_text(config)
        tb.reload_config(str(base / "tierbase.toml"))
        for name, role in principals:
            make_principal(tb, name, role)
        with serving(tb):
            yield shop
    finally:
        teardown_platform(tb, base)


@contextlib.contextmanager
def api_service(tb: Tierbase) -> Iterator[str]:
    """The API over ``tb`` on a real port, written where the CLI finds it (home/service.json, this
    process's pid); yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tb), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    tb.home.service.write_text(json.dumps({"api_url": url, "pid": os.getpid()}))
    try:
        yield url
    finally:
        tb.home.service.unlink(missing_ok=True)
        server.should_exit = True
        thread.join(10)
