"""Shared fixtures: one real platform (btrfs on a loop mount, real postgres) per session.

Each test gets its own copy-on-write branch of the seeded production branch,
which is the product's own point: initdb runs once, branches cost ~100 ms.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.compute.ports import ephemeral_range
from tierbase.proxy import ProxyThread
from tierbase.service import make_proxy

ROOT = os.geteuid() == 0
HAVE_BTRFS = shutil.which("mkfs.btrfs") is not None

needs_root_btrfs = pytest.mark.skipif(
    not (ROOT and HAVE_BTRFS),
    reason="needs root and btrfs-progs to loop-mount a btrfs image (run `make test` as root)",
)


def _below_ephemeral() -> int:
    """Test ports stay below the kernel's ephemeral range, as the platform's own do."""
    return min(ephemeral_range()[0], 32768)


def free_port_base(span: int = 2000) -> int:
    """A random base with the first few ports free; homes in one run must not share ports."""
    for _ in range(50):
        base = 10000 + secrets.randbelow((_below_ephemeral() - 10000 - span) // span + 1) * span
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base))
            except OSError:
                continue
        return base
    raise RuntimeError("no free port range")


def free_port() -> int:
    """A free single port (API, proxy) below the ephemeral range and below every compute block."""
    for _ in range(200):
        port = 7000 + secrets.randbelow(3000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _service_python() -> None:
    """The service runs as the compute user, who cannot run an interpreter under /root (pyenv):
    use the venv `make install` (scripts/service-python.sh) made for it, unless one was chosen."""
    if not ROOT or os.environ.get("TIERBASE_PYTHON"):
        return
    exe = Path(sys.executable).resolve()
    if all(p.stat().st_mode & stat.S_IXOTH for p in exe.parents):
        return
    venv = Path(os.environ.get("TIERBASE_SERVICE_VENV", "/opt/tierbase/venv")) / "bin" / "python"
    if venv.exists():
        os.environ["TIERBASE_PYTHON"] = str(venv)


_service_python()


def make_home() -> Path:
    # not pytest's tmp_path: /tmp/pytest-of-root is 0700 and the compute user must reach in
    path = Path(tempfile.mkdtemp(prefix="tierbase-test-", dir="/tmp"))
    path.chmod(0o711)
    return path


def teardown_platform(tb: Tierbase, base: Path) -> None:
    """down --purge; if that fails, still leave no process, mount, loop device or directory behind."""
    try:
        tb.down(purge=True)
    finally:
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if str(base) in cmd and "postgres" in cmd:
                    with contextlib.suppress(OSError):
                        os.kill(int(proc.name), signal.SIGKILL)
        volumes = tb.home.root / "volumes"
        mounts = Path("/proc/self/mounts").read_text()
        if f" {volumes} " in mounts:
            subprocess.run(["umount", "-l", str(volumes)], check=False)
        image = tb.home.root / "btrfs.img"
        loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
        for line in loops.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def platform() -> Iterator[Tierbase]:
    """A running platform whose production branch holds a seeded table ``seed``."""
    if not (ROOT and HAVE_BTRFS):
        pytest.skip("needs root and btrfs-progs to loop-mount a btrfs image (run `make test` as root)")
    home = make_home() / "home"
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(home)
    proxy: ProxyThread | None = None
    try:
        tb.init(storage="btrfs", btrfs_size="4G", proxy_port=free_port())
        # the service's own proxy, in this process: URLs from branch_url() go through it, as in production
        proxy = ProxyThread(make_proxy(tb)).start()
        tb.start_branch("production")
        with psycopg.connect(tb.branch_url("production"), autocommit=True) as conn:
            conn.execute("CREATE TABLE seed (id int PRIMARY KEY, label text NOT NULL)")
            conn.execute("INSERT INTO seed SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        yield tb
    finally:
        if proxy is not None:
            proxy.stop()
        teardown_platform(tb, home.parent)


@pytest.fixture
def branch(platform: Tierbase, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh feature branch of production, deleted afterwards."""
    name = f"t-{secrets.token_hex(4)}"
    platform.create_branch(name)
    yield name
    if platform.store.find(name):
        platform.delete_branch(name, recursive=True)


#: tokens of the principals tests made, so that a test can act as one with its own credentials
TOKENS: dict[tuple[str, str], str] = {}


def make_principal(tb: Tierbase, name: str, role: str) -> str:
    token = str(tb.create_principal(name, role)["token"])
    TOKENS[(str(tb.home.root), name)] = token
    return token


def as_(tb: Tierbase, name: str) -> Tierbase:
    """The platform acting as principal ``name`` (made by make_principal), holding its token."""
    return tb.as_principal(name, token=TOKENS.get((str(tb.home.root), name)))


@contextlib.contextmanager
def serving(tb: Tierbase) -> Iterator[ProxyThread]:
    """The service's own proxy for ``tb``, in this process: branch_url() URLs reach computes through it."""
    t = ProxyThread(make_proxy(tb)).start()
    try:
        yield t
    finally:
        t.stop()


def drop_database(url: str, dbname: str) -> None:
    """DROP DATABASE ... WITH (FORCE) as a platform engineer's login role, which is not a superuser.

    Postgres 15 lets only a superuser terminate an autovacuum worker (its backend has no role), so
    the drop fails with 42501 while one is working in the database; it ends within seconds, retry."""
    deadline = time.monotonic() + 30
    while True:
        try:
            query(url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def query(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []
