"""Small helpers every benchmark script shares: logging, percentiles, ports."""

from __future__ import annotations

import json
import math
import secrets
import socket
import time
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between the closest ranks."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port for an API or proxy: tierbase refuses ports in the kernel's ephemeral range."""
    for _ in range(200):
        port = 7000 + secrets.randbelow(3000)
        if port_free(port):
            return port
    raise RuntimeError("no free port in 7000-9999")


def write_results(doc: dict[str, Any], out: Path, *, report: bool = True) -> None:
    """Write a benchmark's JSON and, unless told not to, re-render docs/benchmarks.md."""
    from bench.report import render_all

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    if report:
        log(f"wrote {render_all()}")
