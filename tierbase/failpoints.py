"""Failpoints: named places where a test can make the process die (like Neon's failpoints).

``TIERBASE_FAILPOINTS=create:cloned`` makes the process SIGKILL itself when it
reaches that point, which is how tests prove that reconcile repairs a crash at
that exact instruction. Unset, a failpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

from .settings import value


def failpoint(name: str) -> None:
    armed = value("failpoints")
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
