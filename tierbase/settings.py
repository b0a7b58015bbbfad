"""Every setting of tierbase in one table: name, default, environment override, help.

Two kinds, as in datasette's settings table:

* **data-dir settings** (``stored=True``) live in the ``settings`` table of meta.db, set by
  ``tierbase up`` options; the default here is what a data dir without the row gets.
* **process settings** (``stored=False``) come from the environment of the process that runs
  (the CLI, ``tierbase up``, the service it starts, which inherits that environment).

Code reads a default with :func:`default` and a process setting with :func:`value`; nothing else in
tierbase reads ``TIERBASE_*`` variables (tests/test_settings.py holds it). A malformed value is
refused with what to do, never half-read. Stdlib only: the CLI imports this.
"""

from __future__ import annotations

import os
import re

from .errors import InvalidInput

TYPE_CHECKING = False  # not typing's: the CLI imports this module on every call
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

GiB, MiB = 1024**3, 1024**2


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def _pg_size(text: str) -> str:
    """A size as postgres reads it (it goes onto a compute's command line): digits and kB, MB or GB."""
    m = re.fullmatch(r"([1-9][0-9]{0,6})(kb|mb|gb)", text.strip().lower())
    if m is None:
        raise ValueError(text)
    return m.group(1) + {"kb": "kB", "mb": "MB", "gb": "GB"}[m.group(2)]


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip().lower() not in allowed:
            raise ValueError(text)
        return text.strip().lower()
    return parse


class Setting:
    """One row of the table (a plain class: dataclasses imports inspect, ~12 ms of every CLI call)."""

    __slots__ = ("default", "env", "help", "kind", "name", "parse", "stored")

    def __init__(self, name: str, default: Any, help: str, env: str | None = None, stored: bool = False,
                 parse: Callable[[str], Any] = str, kind: str = "text") -> None:
        self.name = name
        self.default = default
        self.help = help
        #: the environment variable that overrides it (process settings; a few data-dir ones at first `up`)
        self.env = env
        #: True: kept per data dir in meta.db's settings table
        self.stored = stored
        #: text (from the environment) -> value
        self.parse = parse
        #: what a value looks like, for the error about a bad one
        self.kind = kind

    def __repr__(self) -> str:
        return f"Setting({self.name!r}, {self.default!r}, env={self.env!r}, stored={self.stored})"


_TABLE = (
    # -- data-dir settings (meta.db), chosen by `tierbase up` ------------------------------------
    Setting("driver", "auto", "storage driver: auto (btrfs whenever possible), btrfs, copy", stored=True),
    Setting("btrfs_size", "20G", "size of the sparse btrfs image loop-mounted when the data dir is not on "
            "btrfs (`up --btrfs-size`)", stored=True),
    Setting("api_port", 25430, "TCP port of the HTTP API (`up --api-port`); below the kernel's ephemeral range",
            stored=True, parse=int, kind="a port number"),
    Setting("proxy_port", 25431, "TCP port of the Postgres proxy (`up --proxy-port`)", stored=True, parse=int,
            kind="a port number"),
    Setting("port_base", 25432, "first compute port, chosen at the first `up` and kept; computes get ports "
            "from it upwards", env="TIERBASE_PORT_BASE", stored=True, parse=int, kind="a port number"),
    Setting("idle_timeout", 300, "seconds without a client after which the service suspends a compute; 0 "
            "never (`up --idle-timeout`)", stored=True, parse=int, kind="a number of seconds"),
    Setting("import_max_bytes", 4 * GiB, "largest dump an import accepts (`up --import-limit`)", stored=True,
            parse=int, kind="a number of bytes"),
    Setting("plain_loopback", True, "accept plain-text (non-TLS) proxy connections from loopback", stored=True,
            parse=_bool, kind="true or false"),
    Setting("tls_cert", None, "the operator's certificate for the proxy (PEM path); default: the platform CA's",
            stored=True),
    Setting("tls_key", None, "the key of tls_cert (PEM path)", stored=True),
    # -- process settings (environment) --------------------------------------------------------
    Setting("home", None, "the data dir; default /var/lib/tierbase for root, else ~/.local/share/tierbase",
            env="TIERBASE_HOME"),
    Setting("api", None, "URL of the service's API, for clients that cannot read the data dir", env="TIERBASE_API"),
    Setting("token", None, "the API token a client acts with", env="TIERBASE_TOKEN"),
    Setting("compute_user", "postgres", "OS user computes and the service run as when tierbase runs as root",
            env="TIERBASE_COMPUTE_USER"),
    Setting("pg_bindir", None, "directory of the postgres server binaries (default: PATH, pg_config, "
            "/usr/lib/postgresql/<major>/bin)", env="TIERBASE_PG_BINDIR"),
    Setting("python", None, "interpreter the service runs on, when this one is out of the service user's reach",
            env="TIERBASE_PYTHON"),
    Setting("service_venv", "/opt/tierbase/venv", "venv scripts/service-python.sh makes for the service user",
            env="TIERBASE_SERVICE_VENV"),
    Setting("sweep_interval", 30.0, "seconds between two TTL sweeps of the service", env="TIERBASE_SWEEP_INTERVAL",
            parse=float, kind="a number of seconds"),
    Setting("checkpoint_min_wal", 16 * MiB, "a fork skips the parent's CHECKPOINT when less WAL than this (bytes) "
            "was written since the last one", env="TIERBASE_CHECKPOINT_MIN_WAL", parse=int, kind="a number of bytes"),
    Setting("image_max_age", 24 * 3600.0, "seconds after which the service re-masks a sensitive tier's masked image",
            env="TIERBASE_IMAGE_MAX_AGE", parse=float, kind="a number of seconds"),
    Setting("recovery_shared_buffers", "256MB", "shared_buffers of a compute while it replays WAL to a point in "
            "time (branch --at, restore): room for the pages the replay touches (that start only)",
            env="TIERBASE_RECOVERY_SHARED_BUFFERS", parse=_pg_size, kind="a Postgres size such as 256MB"),
    Setting("rollback_replay", "logical", "how a rollback finds the rows written since the promotion: logical "
            "(decode the WAL of a slot made at the promotion; tiers run wal_level=logical; the data diff when "
            "there is no usable slot) or diff (compare the tables on both branches)", env="TIERBASE_ROLLBACK_REPLAY",
            parse=_choice("logical", "diff"), kind="logical or diff"),
    Setting("rollback_slot_max_wal", "1GB", "max_slot_wal_keep_size of a tier's compute: the most WAL a "
            "promotion's slot may hold back; past it the slot is invalidated and a rollback uses the data diff",
            env="TIERBASE_ROLLBACK_SLOT_MAX_WAL", parse=_pg_size, kind="a Postgres size such as 1GB"),
    Setting("failpoints", "", "comma-separated failpoints at which the process kills itself (tests only)",
            env="TIERBASE_FAILPOINTS"),
    # -- fixed by design, named here so that they are found in one place ------------------------
    Setting("compute_ports", 2000, "how many ports the computes of one data dir may use, from port_base up"),
    Setting("audit_window", 60.0, "seconds over which frequent events (proxied logins, failed tokens) are folded "
            "into one audit record with a count"),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}


def setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise InvalidInput(f"{name!r} is not a tierbase setting", f"Use one of: {', '.join(SETTINGS)}") from None


def default(name: str) -> Any:
    """The built-in default of a setting (a data dir's when its row is missing)."""
    return setting(name).default


def from_env(name: str) -> Any:
    """The environment's value of a setting, parsed; None when the variable is unset or empty."""
    s = setting(name)
    raw = os.environ.get(s.env) if s.env else None
    if raw is None or raw == "":
        return None
    try:
        return s.parse(raw)
    except ValueError:
        raise InvalidInput(f"{s.env}={raw!r} is not {s.kind}",
                           f"Set {s.env} to {s.kind} ({s.help}), or unset it for the default "
                           f"{s.default!r}") from None


def value(name: str) -> Any:
    """A process setting: the environment's value, else the default."""
    got = from_env(name)
    return default(name) if got is None else got


def describe() -> list[dict[str, Any]]:
    """The table, for documentation and `--json` listings."""
    return [{"name": s.name, "default": s.default, "env": s.env, "stored": s.stored, "help": s.help}
            for s in _TABLE]
