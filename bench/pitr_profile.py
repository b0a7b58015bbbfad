"""Where a branch at a point in time spends its time: a timeline of one ``create_branch(at=T)``.

Builds a small platform like bench/pitr.py (a tier under pgbench, ``--wal-mb`` of WAL since a base
snapshot, T, ``--after`` seconds of load), then branches at T ``--runs`` times and prints, per run, the
library's own phases (PointInTime.recover records them) and the compute's log lines with their time
since the call (each segment the restore command brought, redo start/done, the new timeline, ready),
then the first query through the proxy. Not a timed benchmark: a profile to read (no results file).

    python bench/pitr_profile.py --scale 8 --wal-mb 100 --after 30 --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, log  # noqa: E402
from bench.pitr import CONFIG, Load, MiB, first_query, iso, run, wal_lsn  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import archive, find_binaries  # noqa: E402
from tierbase.proxy import ProxyThread  # noqa: E402
from tierbase.service import make_proxy  # noqa: E402

#: log lines worth a place on the timeline (PostgreSQL 15 wording)
EVENTS = re.compile(r"starting PostgreSQL|starting point-in-time recovery|restored log file|redo starts|"
                    r"consistent recovery state|recovery stopping|redo done|selected new timeline|"
                    r"archive recovery complete|ready to accept|checkpoint starting|received promote|"
                    r"database system is ready|pausing at the end|syncing data directory")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+) \[\d+\] (.*)$")


def timeline(logfile: Path, offset: int, t0: float, every: bool = False) -> list[tuple[float, str]]:
    out = []
    with open(logfile, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            m = STAMP.match(line)
            if m and (every or EVENTS.search(m.group(3))):
                when = datetime.strptime(m.group(1) + " " + m.group(2), "%Y-%m-%d %H:%M:%S.%f %Z").timestamp()
                out.append((when - t0, m.group(3)[:110]))
    return out


def script_costs(tb: Tierbase, key: str, redo: str) -> None:
    """What the restore command costs per segment, run as the compute runs it (the compute user, onto
    the pool), against a reflink copy alone and the checksum programs alone."""
    pg = tb.branches.provider.pg
    wal = tb.history_log.wal_dir(key)
    script = tb.history_log.script()
    scratch = tb.branches.provider.driver.root / ".prof"
    scratch.mkdir(exist_ok=True)
    pg.user.chown(scratch)
    first = archive.parse_lsn(redo)
    names = [s.name for s in archive.segments(wal)
             if (r := archive.segment_range(s.name)) and r[2] > first]
    ways = {"restore script": lambda n, d: [str(script), "restore", str(wal), n, str(d)],
            "cp --reflink only": lambda n, d: ["cp", "--reflink=auto", str(wal / n), str(d)],
            "openssl sha256 only": lambda n, d: ["openssl", "dgst", "-sha256", "-r", str(wal / n)],
            "cksum (CRC-32) only": lambda n, d: ["cksum", str(wal / n)],
            "sh -c true": lambda n, d: ["sh", "-c", "true"]}
    for way, argv in ways.items():
        took = []
        for n in names:
            dest = scratch / "RECOVERYXLOG"
            dest.unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(argv(n, dest), check=True, stdout=subprocess.DEVNULL, **pg.user.run_kwargs())
            took.append((time.perf_counter() - t0) * 1000)
        print(f"    {way:>22}: {statistics.mean(took):6.1f} ms per segment (max {max(took):.1f}, {len(took)} segments)")
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--wal-mb", type=int, default=100)
    ap.add_argument("--after", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pool-size", default="6G")
    ap.add_argument("--variants", default="",
                    help="settings added to the recovery's, run by run in turn: 'a=1,b=2;c=3' (';' between variants, "
                         "an empty one for none)")
    ap.add_argument("--all-lines", action="store_true", help="every line of the compute's log, not only the events")
    args = ap.parse_args()
    variants = [dict(kv.split("=", 1) for kv in v.split(",") if kv) for v in args.variants.split(";")]
    chosen: dict[str, str] = {}
    plain = archive.recovery_settings

    def with_variant(*a: Any, **kw: Any) -> dict[str, str]:
        return {**plain(*a, **kw), **{k: v for k, v in chosen.items() if not k.startswith("_")}}

    archive.recovery_settings = with_variant  # type: ignore[assignment]
    # "_place=off" in a variant: no segments placed into pg_wal beforehand (every one through the script)
    place = archive.to_place

    def to_place(*a: Any, **kw: Any) -> list[str]:
        return [] if chosen.get("_place") == "off" else place(*a, **kw)

    archive.to_place = to_place  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix="tierbase-bench-pitrprof-", dir="/tmp"))
    tmp.chmod(0o711)
    (tmp / "tierbase.toml").write_text(CONFIG)
    os.environ["TIERBASE_PORT_BASE"] = str(13000 + os.getpid() % 300 * 20)
    tb = Tierbase(tmp / "home")
    proxy: ProxyThread | None = None
    load: Load | None = None
    try:
        tb.init(storage="btrfs", btrfs_size=args.pool_size, proxy_port=free_port(), config=str(tmp / "tierbase.toml"))
        proxy = ProxyThread(make_proxy(tb)).start()
        tb.start_branch("production")
        url = tb.branch_url("production")
        run([str(find_binaries().bindir / "pgbench"), "-i", "-q", "-s", str(args.scale), url])
        base = tb.take_base_snapshot("production", "bench")
        redo0 = archive.parse_lsn(base["redo_lsn"])
        load = Load(url, 2, None)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS batch (id bigint, payload text)")
            while wal_lsn(url) - redo0 < args.wal_mb * MiB:
                conn.execute("INSERT INTO batch SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        target = iso(time.time())
        load.stop()
        load = Load(url, 1, 200)
        log(f"T = {target}; waiting {args.after} s under load")
        time.sleep(args.after)
        script_costs(tb, tb.history_log.key(tb.store.get("production")) or "", base["redo_lsn"])
        for i in range(args.runs):
            name = f"prof-{i}"
            chosen.clear()
            chosen.update(variants[i % len(variants)])
            logfile = tb.home.root / "logs" / f"{name}.log"
            t0w, t0 = time.time(), time.perf_counter()
            info = tb.create_branch(name, "production", at=target)
            t_made = time.perf_counter() - t0
            first_query(tb.branch_url(name))
            t_query = time.perf_counter() - t0
            print(f"--- run {i} {chosen} (load {os.getloadavg()[0]:.1f}): first query at {t_query * 1000:.0f} ms")
            for k, v in info["phases"].items():
                print(f"    phase {k:>18}: {v}")
            for at, what in timeline(logfile, 0, t0w, every=args.all_lines):
                print(f"    {at * 1000:7.0f} ms  {what}")
            print(f"    {t_made * 1000:7.0f} ms  create_branch returned")
            print(f"    {t_query * 1000:7.0f} ms  first query through the proxy answered")
            tb.delete_branch(name)
    finally:
        if load is not None:
            load.stop()
        if proxy is not None:
            proxy.stop()
        from tests.conftest import teardown_platform

        teardown_platform(tb, tmp)


if __name__ == "__main__":
    main()
