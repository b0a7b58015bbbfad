"""The CI runner: takes queued runs from the platform, tests the exact commit, reports what pytest wrote.

It acts as a ``ci`` principal (its token), ideally under an OS user of its
own. For each run the platform has already made ``ci-<feature>`` from the
tier and applied the commit's migrations; the runner checks the commit out
from the platform's bundle into a fresh directory, runs the **tier's** test
command (the platform read it from the tier's recorded tierbase.toml) with
DATABASE_URL carrying the runner's own credentials through the proxy, and
sends the JUnit XML and the log back. The platform parses the JUnit itself
and records ci-green for that commit only; nothing the author wrote decides.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..errors import Refused, TierbaseError
from . import testrun


class RunnerPlatform(Protocol):
    def ci_take(self) -> dict[str, Any] | None: ...

    def ci_report(self, run: int, junit: str | None, output: str, exit_code: int,
                  duration_s: float) -> dict[str, Any]: ...

    def branch_url(self, name: str, dbname: str = "postgres", direct: bool = False) -> str: ...


def checkout(bundle: bytes, sha: str, where: Path) -> None:
    """The commit ``sha`` from ``bundle``, checked out in a new repository at ``where`` (no config of ours)."""
    where.mkdir(parents=True)
    src = where.parent / "run.bundle"
    src.write_bytes(bundle)

    def git(*args: str) -> None:
        got = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=300)
        if got.returncode != 0:
            raise TierbaseError(f"`git {' '.join(args)}` failed: {got.stderr.strip()[:300]}",
                                "The platform's bundle could not be checked out")

    git("init", "--quiet")
    git("fetch", "--quiet", "--no-tags", str(src), "+refs/tierbase/out/*:refs/remotes/platform/*")
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha)
    src.unlink()


def run_one(platform: RunnerPlatform, *, os_user: str | None = None) -> dict[str, Any] | None:
    """Take one queued run and report it; None when nothing is queued."""
    job = platform.ci_take()
    if job is None:
        return None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tierbase-ci-") as tmp:
        tree = Path(tmp) / "tree"
        try:
            checkout(base64.b64decode(job["bundle"]), str(job["sha"]), tree)
            if os_user is not None:
                shutil.chown(tmp, os_user)
                for p in [tree, *tree.rglob("*")]:
                    shutil.chown(p, os_user)
            url = platform.branch_url(str(job["ci_branch"]), str(job["database"]))
            got = testrun.run(str(job["command"]), tree, url, user=os_user)
            header = (f"tierbase ci runner: run #{job['id']} of {job['feature']} at {job['sha']}\n"
                      f"command (the tier's): {job['command']}\n\n")
            return platform.ci_report(int(job["id"]), got.junit_xml, header + got.output, got.exit_code,
                                      got.duration_s)
        except (TierbaseError, OSError, subprocess.SubprocessError) as err:
            # never leave a run hanging: report it, and the platform records it as failed
            return platform.ci_report(int(job["id"]), None, f"the runner failed: {err}", -1,
                                      round(time.monotonic() - t0, 2))


def serve(platform: RunnerPlatform, *, os_user: str | None = None, poll: float = 1.0,
          stop: threading.Event | None = None, once: bool = False) -> int:
    """Run jobs until ``stop`` is set (or, with ``once``, until the queue is empty); returns how many ran."""
    done = 0
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            got = run_one(platform, os_user=os_user)
        except Refused:
            raise  # not a runner's token: stop at once rather than be refused every poll
        except TierbaseError:
            got = None  # the service restarting: look again at the next poll
            if once:
                raise
        if got is not None:
            done += 1
            continue
        if once:
            break
        stop.wait(poll)
    return done
