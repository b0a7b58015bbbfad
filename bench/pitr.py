"""Time travel: a branch of a tier under pgbench write load as it was minutes ago.

One run, on one throwaway platform (btrfs loop mount, real postgres, the proxy in this process):

1. archiving's cost: pgbench TPS on production (archiving on) and on a feature branch of it
   (archiving off), alternated;
2. a base snapshot of production (and, for the alternative, a ``pg_basebackup`` of it at the
   same moment), then pgbench writes until ``--wal-mb`` of WAL were written since: that instant is
   T, when a ``pg_dump`` of production is also made (the "pre-made copy"); the load goes on for
   ``--after`` seconds (T-5 min by default), and stays on during the measurements;
3. ``create_branch(..., at=T)`` ``--runs`` times: from the call to the first query answered through
   the proxy, the WAL replayed (bytes from the base's REDO point to where the branch ends, and the
   redo seconds postgres logs), MB/s;
4. the same point reached with the ``pg_basebackup`` copy + PostgreSQL's own PITR from the same
   archive, and with ``pg_restore`` of the pre-made dump into a new database.

    python bench/pitr.py --scale 20 --wal-mb 100 --after 300 --runs 5 --out bench/results/pitr.json
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, log, pct, write_results  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import archive, find_binaries  # noqa: E402
from tierbase.errors import TierbaseError  # noqa: E402
from tierbase.proxy import ProxyThread  # noqa: E402
from tierbase.service import make_proxy  # noqa: E402

MiB = 1024 ** 2
CONFIG = '[tiers.production]\nprotected = true\nentry = true\nhistory = "1d"\nbase_interval = "1d"\n'


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(args, capture_output=True, text=True, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({got.returncode}): {got.stderr.strip()[-800:]}")
    return got


def tps(url: str, seconds: int, clients: int) -> float:
    out = run([str(find_binaries().bindir / "pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, 2)),
               "-T", str(seconds), url]).stdout
    m = re.search(r"tps = ([0-9.]+) \(without initial", out)
    return float(m.group(1)) if m else 0.0


def wal_lsn(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return archive.parse_lsn(str(row[0])) if row else 0


#: the compute's log lines that mark the steps of a recovery (PostgreSQL 15 wording), and the step each starts
STEPS = {"starting PostgreSQL": "pg_started", "redo starts at": "redo_started", "redo done at": "redo_done",
         "database system is ready to accept connections": "promoted"}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+) \[\d+\] (.*)$")


def log_steps(logfile: Path, since: float) -> dict[str, float]:
    """Milliseconds from ``since`` (epoch seconds) to each step's first log line at or after it."""
    out: dict[str, float] = {}
    for line in logfile.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        stamp = datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S.%f %Z")
        when = stamp.replace(tzinfo=UTC).timestamp()
        for words, step in STEPS.items():
            if words in m.group(3) and step not in out and when >= since - 0.001:
                out[step] = round((when - since) * 1000, 1)
    return out


def breakdown(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The median run's steps, from the library call to the first query through the proxy."""
    def med(f: Any) -> float | None:
        got = [v for r in rows if (v := f(r)) is not None]
        return round(statistics.median(got)) if got else None

    def span(a: str, b: str) -> Any:
        return lambda r: r["steps"][b] - r["steps"][a] if a in r["steps"] and b in r["steps"] else None

    ph = "phases"
    return [
        ["policy, pool room, the parent's segment switch", med(lambda r: r[ph]["archive_ms"])],
        ["clone of the base snapshot, segments placed into pg_wal (count: "
         f"{med(lambda r: r[ph].get('placed_segments'))})", med(lambda r: r[ph].get("prepare_ms"))],
        ["pg_ctl start to the first record replayed (postgres' start, its data-dir sync)",
         med(lambda r: r["steps"]["redo_started"] - r[ph]["archive_ms"] - r[ph].get("prepare_ms", 0)
             if "redo_started" in r["steps"] else None)],
        ["redo (postgres' own count in the log)", med(span("redo_started", "redo_done"))],
        ["end of recovery: new timeline, promotion, ready", med(span("redo_done", "promoted"))],
        ["branch row ready, first query through the proxy", med(lambda r: r["seconds"] * 1000 - r["steps"]["promoted"]
                                                             if "promoted" in r["steps"] else None)],
        ["total (median run)", med(lambda r: r["seconds"] * 1000)],
    ]


def redo_seconds(logfile: Path) -> float | None:
    m = re.findall(r"redo done at .* elapsed: ([0-9.]+) s", logfile.read_text(errors="replace"))
    return float(m[-1]) if m else None


class Load:
    """pgbench's TPC-B-like writes on production in the background until stopped."""

    def __init__(self, url: str, clients: int, rate: int | None) -> None:
        args = [str(find_binaries().bindir / "pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, 2)),
                "-T", "86400", *(["-R", str(rate)] if rate else []), url]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def first_query(url: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=60) as conn:
        conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()


def basebackup_pitr(tb: Tierbase, backup: Path, work: Path, key: str, target: str, port: int) -> dict[str, Any]:
    """The alternative without copy-on-write: copy a pg_basebackup, recover it to T from the same
    archive with PostgreSQL's own settings, first query."""
    pg = tb.branches.provider.pg
    dest = work / "bb-restore"
    sock = work / "bb-sock"
    t0 = time.perf_counter()
    run(["cp", "-a", str(backup), str(dest)])
    (dest / "recovery.signal").write_text("")
    pg.user.chown(dest / "recovery.signal")
    sock.mkdir(exist_ok=True)
    pg.user.chown(sock)
    script = archive.install_script(tb.home.root / "bin")
    restore = shlex.quote(f"{script} restore {tb.history_log.wal_dir(key)} %f %p")
    opts = (f"-p {port} -c listen_addresses='' -c unix_socket_directories='{sock}' -c archive_mode=off "
            f"-c restore_command={restore} -c recovery_target_time={shlex.quote(target)} "
            "-c recovery_target_action=promote -c recovery_target_timeline=latest")
    pg.run([pg.bins["pg_ctl"], "start", "-w", "-t", "600", "-D", str(dest), "-l", str(work / "bb.log"), "-o", opts],
           what="pg_ctl start (basebackup copy)", where=dest)
    with psycopg.connect(host=str(sock), port=port, user="tierbase", dbname="postgres", autocommit=True) as conn:
        while conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
            time.sleep(0.01)
        conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()
    seconds = time.perf_counter() - t0
    pg.run([pg.bins["pg_ctl"], "stop", "-m", "immediate", "-D", str(dest)], what="pg_ctl stop", where=dest)
    redo = redo_seconds(work / "bb.log")
    shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": round(seconds, 2), "redo_s": redo}


def tps_doc(args: argparse.Namespace, on: list[float], off: list[float], cost: float, size: int,
            load_avg: tuple[float, float, float]) -> dict[str, Any]:
    """Archiving's cost alone: the tier (archive_mode on) against a feature branch of it (off), alternated."""
    spread = statistics.pstdev(on + off) / statistics.mean(on + off) if on else 0.0
    return {
        "title": "Time travel: what archiving costs a tier's TPS",
        "targets": [{"target": "archiving's cost on TPS (pgbench -c 4)", "goal": "< 5 %",
                     "measured": f"{cost:.1%} over {len(on)} alternated rounds of {args.tps_seconds} s",
                     "met": cost < 0.05}],
        "tables": [{"title": f"pgbench -c 4 on a {size / MiB:.0f} MiB tier, archiving on and off, alternated",
                    "columns": ["archiving", "TPS runs", "mean TPS"],
                    "rows": [["on (tier)", on, round(statistics.mean(on), 1)],
                             ["off (feature branch of it)", off, round(statistics.mean(off), 1)]],
                    "notes": [f"cost {cost:.1%}; the rounds spread by {spread:.1%} (standard deviation over mean), "
                              "so a difference below that is noise",
                              "the off side is a feature branch of the tier, which also sits in the features' "
                              "quota group (btrfs simple quotas, disk-full isolation): a negative cost means that "
                              "difference, and the noise, outweigh archiving's own cost",
                              f"load average at start {load_avg[0]:.1f}"]}],
        "meta": {"command": " ".join(["python", "bench/pitr.py", *sys.argv[1:]]), "date": iso(time.time())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=20, help="pgbench scale (~15 MB each)")
    ap.add_argument("--wal-mb", type=int, default=100, help="WAL written between the base snapshot and T")
    ap.add_argument("--after", type=int, default=300, help="seconds between T and the measurements")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pool-size", default="12G",
                    help="the btrfs pool (an hour of this load archives several GB of WAL: 40G for --later 3600)")
    ap.add_argument("--recovery-buffers", default="",
                    help="shared_buffers of the recovering compute, alternated run by run (e.g. 256MB,1GB)")
    ap.add_argument("--later", type=int, default=0,
                    help="after everything else, wait until T + this many seconds (e.g. 3600) and branch at T again")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rate", type=int, default=0, help="pgbench -R for the background load after T (0: none)")
    ap.add_argument("--tps-seconds", type=int, default=20)
    ap.add_argument("--tps-rounds", type=int, default=3)
    ap.add_argument("--alt-runs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pitr.json"))
    ap.add_argument("--skip-tps", action="store_true", help="leave out archiving's TPS cost")
    ap.add_argument("--tps-only", action="store_true",
                    help="only archiving's TPS cost (more --tps-rounds for a steadier number), to its own file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark loop-mounts a btrfs image")
    tmp = Path(tempfile.mkdtemp(prefix="tierbase-bench-pitr-", dir="/tmp"))
    tmp.chmod(0o711)
    (tmp / "tierbase.toml").write_text(CONFIG)
    os.environ["TIERBASE_PORT_BASE"] = str(13000 + os.getpid() % 300 * 20)
    tb = Tierbase(tmp / "home")
    proxy: ProxyThread | None = None
    load: Load | None = None
    load_avg = os.getloadavg()
    try:
        tb.init(storage="btrfs", btrfs_size=args.pool_size, proxy_port=free_port(), config=str(tmp / "tierbase.toml"))
        proxy = ProxyThread(make_proxy(tb)).start()
        tb.start_branch("production")
        url = tb.branch_url("production")
        log(f"pgbench -i -s {args.scale}")
        run([str(find_binaries().bindir / "pgbench"), "-i", "-q", "-s", str(args.scale), url])
        with psycopg.connect(url, autocommit=True) as conn:
            size = int(conn.execute("SELECT pg_database_size('postgres')").fetchone()[0])  # type: ignore[index]

        # 1. archiving's cost on TPS: production archives, a feature branch of it does not
        on, off = [], []
        if not args.skip_tps:
            tb.create_branch("noarch", "production")
            tb.start_branch("noarch")
            for _ in range(args.tps_rounds):
                on.append(tps(url, args.tps_seconds, 4))
                off.append(tps(tb.branch_url("noarch"), args.tps_seconds, 4))
            tb.delete_branch("noarch")
        cost = 1 - statistics.mean(on) / statistics.mean(off) if on else 0.0
        log(f"TPS archiving on {on}, off {off}: cost {cost:.1%}")
        if args.tps_only:
            write_results(tps_doc(args, on, off, cost, size, load_avg), Path(args.out))
            return

        # 2. base snapshot (+ pg_basebackup at the same moment), WAL, T, pre-made dump
        b = tb.store.get("production")
        key = tb.history_log.key(b)
        assert key is not None
        t0 = time.perf_counter()
        base = tb.take_base_snapshot("production", "bench")
        base_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        backup = tmp / "basebackup"
        pg = tb.branches.provider.pg
        tmp.joinpath("bb-parent").mkdir()
        pg.user.chown(tmp / "bb-parent")
        backup = tmp / "bb-parent" / "backup"
        pg.run([pg.bins["pg_basebackup"], "-h", str(tb.branches.provider.sockets), "-p", str(b.port), "-U",
                "tierbase", "-D", str(backup), "-X", "none", "-c", "fast"], what="pg_basebackup", where=backup)
        basebackup_s = time.perf_counter() - t0
        redo0 = archive.parse_lsn(base["redo_lsn"])
        load = Load(url, args.clients, None)
        # on 2 shared cores pgbench alone writes a few MB of WAL a minute: a batch job beside it (INSERTs
        # of 20k rows at a time) brings the WAL since the base up to --wal-mb in about a minute
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS batch (id bigint, payload text)")
            while wal_lsn(url) - redo0 < args.wal_mb * MiB:
                conn.execute("INSERT INTO batch SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        t_target = time.time()
        target = iso(t_target)
        log(f"T = {target} ({(wal_lsn(url) - redo0) / MiB:.0f} MiB of WAL since the base's REDO)")
        dump = tmp / "bb-parent" / "premade.dump"
        t0 = time.perf_counter()
        run([str(find_binaries().bindir / "pg_dump"), "-Fc", "-f", str(dump), url])
        dump_s = time.perf_counter() - t0
        load.stop()
        load = Load(url, args.clients, args.rate or None) if args.rate else Load(url, 1, 200)
        log(f"waiting {args.after} s under load")
        time.sleep(args.after)

        # 3. branch at T
        def branch_at_t(prefix: str) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            variants = [v for v in args.recovery_buffers.split(",") if v]
            for i in range(args.runs):
                name = f"{prefix}-{i}"
                if variants:
                    os.environ["TIERBASE_RECOVERY_SHARED_BUFFERS"] = variants[i % len(variants)]
                t0w, t0 = time.time(), time.perf_counter()
                info = tb.create_branch(name, "production", at=target)
                first_query(tb.branch_url(name))
                seconds = time.perf_counter() - t0
                used = tb.history_log.base(int(info["phases"]["base_id"]))
                replayed = archive.parse_lsn(info["fork_lsn"]) - archive.parse_lsn(used.redo_lsn)
                redo = redo_seconds(tb.home.root / "logs" / f"{name}.log")
                phases = {k: v for k, v in info["phases"].items() if k != "base_id"}
                out.append({"seconds": round(seconds, 3), "replayed_bytes": replayed, "redo_s": redo,
                            "archive_ms": info["phases"]["archive_ms"], "recover_ms": info["phases"]["recover_ms"],
                            "phases": phases, "steps": log_steps(tb.home.root / "logs" / f"{name}.log", t0w),
                            "load_1m": round(os.getloadavg()[0], 1),
                            "recovery_shared_buffers": os.environ.get("TIERBASE_RECOVERY_SHARED_BUFFERS", "256MB")})
                log(f"run {name}: {out[-1]}")
                tb.delete_branch(name)
            return out

        rows = branch_at_t("pit")

        # 4. the alternatives, same point, same archive, same load
        alt_bb = [basebackup_pitr(tb, backup, tmp / "bb-parent", key, target, b.port + 1000)
                  for _ in range(args.alt_runs)]
        log(f"pg_basebackup + PITR: {alt_bb}")
        alt_dump = []
        tb.create_branch("dumpdst", "production")
        for i in range(args.alt_runs):
            t0 = time.perf_counter()
            with psycopg.connect(tb.branch_url("dumpdst"), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE restore_{i}")
            run([str(find_binaries().bindir / "pg_restore"), "-j", "2", "--no-owner", "-d",
                 tb.branch_url("dumpdst", f"restore_{i}"), str(dump)])
            first_query(tb.branch_url("dumpdst", f"restore_{i}"))
            alt_dump.append(round(time.perf_counter() - t0, 2))
        log(f"pg_restore of the pre-made dump: {alt_dump}")
        later: list[dict[str, Any]] = []
        later_error = ""
        if args.later > args.after:
            wait = t_target + args.later - time.time()
            log(f"waiting {wait:.0f} s more under load, until T + {args.later} s")
            time.sleep(max(0.0, wait))
            try:
                later = branch_at_t("pit-later")
            except TierbaseError as err:  # e.g. an hour of archived WAL filled the pool: said, not lost
                later_error = f"{err.code}: {err.message}"
                log(f"the later runs failed: {later_error}")
    finally:
        if load is not None:
            load.stop()
        if proxy is not None:
            proxy.stop()
        from tests.conftest import teardown_platform

        teardown_platform(tb, tmp)

    secs = [r["seconds"] for r in rows]
    p50 = pct(secs, 0.5)
    replayed_mb = statistics.median(r["replayed_bytes"] for r in rows) / MiB
    redo_s = statistics.median(r["redo_s"] or 0 for r in rows)
    wal_target = f"~{args.wal_mb} MB WAL"
    doc = {
        "title": f"Time travel: a branch as of T-{args.after // 60} min of a tier under write load, {wal_target}",
        "targets": [
            {"target": f"branch at T-{args.after // 60} min, command to first query (p50)",
             "goal": f"< 2 s with {wal_target}",
             "measured": f"{p50:.2f} s with {replayed_mb:.0f} MiB replayed", "met": p50 < 2},
            *([{"target": "archiving's cost on TPS (pgbench -c 4)", "goal": "< 5 %",
                "measured": f"{cost:.1%} (runs {min(on + off):.0f}-{max(on + off):.0f} TPS: the machine's "
                            "noise is larger than the effect)", "met": cost < 0.05}] if on else []),
        ],
        "tables": [
            {"title": f"Reaching T-{args.after // 60} min ({size / MiB:.0f} MiB tier, pgbench load on)",
             "columns": ["way", "runs", "p50 s", "max s", "WAL replayed MiB", "redo s (postgres)", "MB/s"],
             "rows": [
                 ["tierbase branch --at (base snapshot clone + archive)", len(secs), round(p50, 2),
                  round(max(secs), 2), round(replayed_mb, 1), redo_s,
                  round(replayed_mb * MiB / 1e6 / redo_s, 1) if redo_s else None],
                 ["pg_basebackup copy + PITR (same archive)", len(alt_bb),
                  round(statistics.median(a["seconds"] for a in alt_bb), 2), max(a["seconds"] for a in alt_bb),
                  round(replayed_mb, 1), statistics.median(a["redo_s"] or 0 for a in alt_bb), None],
                 ["pg_restore of a pg_dump made at T", len(alt_dump), round(statistics.median(alt_dump), 2),
                  max(alt_dump), None, None, None],
                 *([[f"tierbase branch --at, T-{args.later // 60} min (the same T, later)", len(later),
                     round(pct([r["seconds"] for r in later], 0.5), 2), max(r["seconds"] for r in later),
                     round(statistics.median(r["replayed_bytes"] for r in later) / MiB, 1),
                     statistics.median(r["redo_s"] or 0 for r in later), None]] if later else []),
             ],
             "notes": [
                 "WAL since the base: pgbench (-c 2) plus a batch job of INSERTs, then pgbench alone "
                 f"({f'-c {args.clients} -R {args.rate}' if args.rate else '-c 1 -R 200'}) for the minutes up to "
                 "the measurements, and during them",
                 f"base snapshot took {base_ms:.0f} ms; the pg_basebackup made at the same moment took "
                 f"{basebackup_s:.1f} s and the pre-made dump {dump_s:.1f} s (not counted above)",
                 "tierbase's time is the library call (as the API runs it) to the first query through the "
                 "proxy; it includes switching the tier's WAL segment (its archiver copies it while the "
                 "replay runs from the base snapshot)",
                 f"machine: 2 cores (load average at start {load_avg[0]:.1f}, during the runs "
                 f"{max(r['load_1m'] for r in rows):.1f}"
                 + (f", during the later runs {max(r['load_1m'] for r in later):.1f})" if later else ")"),
                 *([f"the runs at T + {args.later // 60} min failed: {later_error}"] if later_error else []),
                 (f"the later row branches at the same T {args.later // 60} min after it, the load on all along: "
                  "what a replay costs depends on the WAL from the newest base snapshot before T to T "
                  "(bounded by the tier's base_interval), not on how long ago T was" if later else
                  "T-1 h was not run (--later 3600 runs it: an hour of load in one run)"),
             ]},
            {"title": f"Where the time of a branch at T-{args.after // 60} min goes (median of {len(rows)} runs, ms)",
             "columns": ["step", "ms"],
             "rows": breakdown(rows),
             "notes": ["steps from the library's own phases (PointInTime.recover) and the compute's log "
                       "timestamps (ms resolution); each row is the median over the runs, so the rows need not "
                       "add up to the median total",
                       "the placed segments are those archived wholly before T: reflinks into the copy's pg_wal "
                       "before postgres starts, checked against their recorded CRC-32 while it replays; the rest "
                       "come through the restore command (`bench/pitr_profile.py` prints one run's full timeline); the "
                       "base's preallocated segment files past its end of WAL are dropped from the copy first",
                       "not taken: `recovery_init_sync_method=syncfs` (the start's data-dir sync) was no faster "
                       "here: the copy's files are clean, so the per-file fsync walk only opens them, while "
                       "syncfs waits for every dirty page of the whole pool, the busy tier's included"]},
            *([] if not on else [{"title": "Archiving's cost on the tier's TPS (pgbench -c 4, alternated)",
             "columns": ["archiving", "TPS runs", "mean TPS"],
             "rows": [["on (tier)", on, round(statistics.mean(on), 1)],
                      ["off (feature branch of it)", off, round(statistics.mean(off), 1)]],
             "notes": [f"cost {cost:.1%}"]}]),
        ],
        "raw": {"runs": rows, "later_runs": later, "basebackup_pitr": alt_bb, "dump_restore": alt_dump},
        "meta": {"command": " ".join(["python", "bench/pitr.py", *sys.argv[1:]]), "date": iso(time.time())},
    }
    write_results(doc, Path(args.out))


if __name__ == "__main__":
    main()
