"""Which TCP ports the platform listens on: never inside the kernel's ephemeral range.

The kernel hands ports of ``net.ipv4.ip_local_port_range`` (32768-60999 on
Linux by default) to every outgoing connection. A listener placed there can
find its port held by any client socket of the machine, at any time (a compute
that could not restart because a connection in TIME-WAIT sat on its port), so
the API, the proxy and every compute listen below that range.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInput
from ..settings import default

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_DEFAULT_RANGE = (32768, 60999)
#: how many ports the computes of one data dir may use, from the base up
COMPUTE_PORTS: int = default("compute_ports")
#: the preferred block: API, proxy, then the computes, well below 32768 (settings.py)
API_PORT: int = default("api_port")
PROXY_PORT: int = default("proxy_port")
PORT_BASE: int = default("port_base")
LOWEST = 1024  # below it only root may bind, and the service is not root


def ephemeral_range(path: Path = RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive)."""
    try:
        lo, hi = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return LINUX_DEFAULT_RANGE
    return lo, hi


@dataclass(frozen=True)
class Ports:
    api: int
    proxy: int
    base: int  # first compute port; computes use base .. base + COMPUTE_PORTS - 1 (at most 65535)


def _outside(lo: int, hi: int, eph: tuple[int, int]) -> bool:
    return hi < eph[0] or lo > eph[1]


def default_ports(eph: tuple[int, int] | None = None) -> Ports:
    """The preferred block, or, when the range was widened over it, a block just below (or above) it."""
    eph = eph or ephemeral_range()
    span = 2 + COMPUTE_PORTS
    for start in (API_PORT, eph[0] - span, eph[1] + 1):
        if start >= LOWEST and start + span - 1 <= 65535 and _outside(start, start + span - 1, eph):
            return Ports(start, start + 1, start + 2)
    raise InvalidInput(f"the kernel's ephemeral port range {eph[0]}-{eph[1]} leaves no room for tierbase's "
                       f"{span} ports", "Narrow net.ipv4.ip_local_port_range (sysctl), e.g. to 32768 60999")


def check_port(port: int, what: str, suggest: str, eph: tuple[int, int] | None = None) -> int:
    """``port`` if the platform may listen on it, else a clear refusal; ``suggest`` names a good choice."""
    eph = eph or ephemeral_range()
    if not LOWEST <= port <= 65535:
        raise InvalidInput(f"{what} {port} is not a port tierbase may listen on",
                           f"Choose one in {LOWEST}-65535 outside {eph[0]}-{eph[1]}, e.g. {suggest}")
    if not _outside(port, port, eph):
        raise InvalidInput(f"{what} {port} lies in the kernel's ephemeral port range {eph[0]}-{eph[1]}, where any "
                           "outgoing connection may hold it", f"Choose a port below {eph[0]}, e.g. {suggest}")
    return port


def check_base(base: int, eph: tuple[int, int] | None = None) -> int:
    """A first compute port (TIERBASE_PORT_BASE) whose whole block lies outside the ephemeral range."""
    eph = eph or ephemeral_range()
    suggest = f"TIERBASE_PORT_BASE={default_ports(eph).base}"
    check_port(base, "the first compute port (TIERBASE_PORT_BASE)", suggest, eph)
    last = min(base + COMPUTE_PORTS - 1, 65535)  # a block high above the range is cut at the top
    if not _outside(base, last, eph):
        raise InvalidInput(f"the compute ports {base}-{last} (TIERBASE_PORT_BASE) reach into the kernel's "
                           f"ephemeral port range {eph[0]}-{eph[1]}", f"Choose a first compute port of at most "
                           f"{eph[0] - COMPUTE_PORTS}, e.g. {suggest}")
    return base


def port_held(port: int, host: str = "127.0.0.1") -> bool:
    """True if another socket holds ``port`` so that postgres could not listen on it.

    Binds as postgres does (SO_REUSEADDR): a connection in TIME-WAIT does not count, a listener
    or a live connection on that port does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
