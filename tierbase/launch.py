"""Starting the background service as the unprivileged service user.

``tierbase up`` may run as root, but only to mount the btrfs image (and reach
a compute user): the service (API, proxy, sweeper) and the computes run as the
compute user, ``compute_user()``. Root hands the data dir over
(``Home.hand_over``) and then starts ``python -m tierbase.service HOME`` as that
user; it never runs as root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .api.client import service_info
from .errors import TierbaseError
from .home import Home
from .provider import ComputeUser
from .settings import from_env, value

START_TIMEOUT = 30.0


#: where `make install` (scripts/service-python.sh) makes an interpreter the service user can run
SERVICE_VENV_PYTHON = Path(value("service_venv")) / "bin" / "python"


def service_python() -> str:
    """The interpreter the service runs on: TIERBASE_PYTHON, else the one running now if others can
    reach it, else the venv `make install` made for the service user.

    Set TIERBASE_PYTHON when this interpreter lives where the service user cannot go
    (a pyenv under /root, a venv in a private home) and there is no such venv.
    """
    chosen = from_env("python")
    if chosen:
        return str(chosen)
    if os.geteuid() == 0 and not _reachable_by_others(Path(sys.executable)) and SERVICE_VENV_PYTHON.exists():
        return str(SERVICE_VENV_PYTHON)
    return sys.executable


def _reachable_by_others(path: Path) -> bool:
    """True if a user who is neither the owner nor in the group could run ``path`` (every dir searchable)."""
    for parent in path.parents:
        try:
            if not parent.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def service_env(user: ComputeUser, python: str) -> dict[str, str]:
    """The service's environment: ours (its settings: TIERBASE_*), as the service user, on our tierbase,
    with the tools installed beside its interpreter (squawk) first on PATH, as in an activated venv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(python).parent), env.get("PATH", "")) if p)
    env.pop("TIERBASE_TOKEN", None)  # the service authenticates others; it holds no one's token
    if not user.is_self:
        home = pwd.getpwuid(user.uid).pw_dir
        env.update(HOME=home if os.path.isdir(home) else "/", USER=user.name, LOGNAME=user.name)
    source = Path(__file__).resolve().parent.parent
    if source.name not in ("site-packages", "dist-packages"):
        # a checkout (editable install): the service must run exactly the code that started it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH", "")) if p)
    return env


def spawn_service(home: Home, user: ComputeUser) -> dict[str, Any]:
    """Start the service for ``home`` as ``user``; its service.json once every port is bound."""
    python = service_python()
    fd = os.open(home.service_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    user.chown(home.service_log)
    try:
        proc = subprocess.Popen([python, "-m", "tierbase.service", str(home.root)], stdin=subprocess.DEVNULL,
                                stdout=fd, stderr=fd, start_new_session=True, cwd="/", env=service_env(user, python),
                                **user.run_kwargs())  # type: ignore[call-overload]
    except OSError as err:
        raise TierbaseError(
            f"the service user {user.name!r} cannot run the Python interpreter {python}: {err.strerror}",
            f"Install tierbase where {user.name!r} can run it (for example `python3 -m venv /opt/tierbase/venv && "
            "/opt/tierbase/venv/bin/pip install tierbase`) and set TIERBASE_PYTHON to that python",
        ) from err
    finally:
        os.close(fd)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = service_info(home)
        if info is not None and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    tail = home.service_log.read_text(errors="replace").strip().splitlines()[-5:]
    hint = f"See {home.service_log}; a port may be taken (choose --api-port/--proxy-port)"
    if any("ModuleNotFoundError" in line for line in tail):
        hint = (f"The service's interpreter {python} lacks a dependency of tierbase: install them there "
                "(as root: scripts/service-python.sh), or set TIERBASE_PYTHON to one that has them")
    raise TierbaseError(f"the service did not start: {' | '.join(tail) or 'no output'}", hint)
