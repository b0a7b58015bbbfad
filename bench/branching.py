"""Benchmark: ways of getting a private, writable copy of a live PostgreSQL database.

    python bench/branching.py --sizes-mb 10,1000 --runs 5 --out bench/results/branching.json

Needs root (the btrfs platform loop-mounts an image). In one run it builds two
throwaway tierbase platforms under /tmp (btrfs and copy), loads a pgbench
database of each size into database ``src`` of both production branches (kept
running, as a live parent would be) and measures, per method and size:

* create: wall time of the command that makes the copy;
* first query: from that command to ``SELECT count(*) FROM pgbench_accounts``
  answered on the copy (tierbase: create, start the branch's compute, connect);
* added bytes: what the copy adds on disk right after creation.

Methods: tierbase btrfs (snapshot), tierbase copy (pg_basebackup),
``CREATE DATABASE ... TEMPLATE src`` with STRATEGY FILE_COPY and WAL_LOG, and
``pg_dump -Fc | pg_restore``. The last three run on the copy platform's
production compute, whose data dir is a plain directory on this machine's root
filesystem: that is plain Postgres as one would run it without tierbase.

Then, on the btrfs platform at the largest size, it measures branching a busy
parent: pgbench write load on production, with and without branches being
created every ~1 s. Writes JSON, then renders docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.common import log, ms, pct, port_free, write_results  # noqa: E402
from bench.report import RESULTS, render_all  # noqa: E402
from tierbase import Tierbase  # noqa: E402
from tierbase.compute import find_binaries  # noqa: E402

SRC = "src"  # the database every method copies
MB_PER_SCALE = 15  # pgbench scale 1 is about 15 MB with its indexes
MiB = 1024 ** 2
ROWS_PER_SCALE = 100_000
TABLE_TITLE = "Branch creation: ways of getting a private copy of a live database"
BUSY_TITLE = "Branching a busy parent (tierbase btrfs)"


# -- small helpers -------------------------------------------------------------------------------
def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def free_port_base(taken: set[int]) -> int:
    """A base above the kernel's ephemeral range and the test suite's bases (20000-59999)."""
    for _ in range(100):
        base = 61000 + secrets.randbelow(20) * 200
        if base not in taken and all(port_free(p) for p in range(base, base + 60)):
            return base
    raise RuntimeError("no free port range in 61000-65000")


def pgbench_bin() -> str:
    local = find_binaries().bindir / "pgbench"
    found = str(local) if local.is_file() else shutil.which("pgbench")
    if not found:
        raise SystemExit("Error: pgbench was not found. Install it (Debian: `apt-get install postgresql-contrib`).")
    return found


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(args, capture_output=True, text=True, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({got.returncode}): {got.stderr.strip()[-800:]}")
    return got


FIRST_QUERY = "SELECT count(*) FROM pgbench_accounts"
# Under load, a light query: a full scan of 1 GB on the same 2 cores would measure the scan, not the branch.
BUSY_QUERY = "SELECT count(*) FROM pgbench_branches"


def first_query(url: str, query: str = FIRST_QUERY) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=60) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


@contextmanager
def admin(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=60) as conn:
        yield conn


# -- platforms -------------------------------------------------------------------------------------
@dataclass
class Platform:
    kind: str  # "btrfs" or "copy"
    tmp: Path
    tb: Tierbase
    port_base: int

    def url(self, branch: str = "production", db: str = SRC) -> str:
        # straight to the compute: no service (and so no proxy) runs in this process
        return self.tb.branch_url(branch, db, direct=True)


def make_platform(kind: str, taken: set[int]) -> Platform:
    tmp = Path(tempfile.mkdtemp(prefix=f"tierbase-bench-{kind}-", dir="/tmp"))
    tmp.chmod(0o711)  # the unprivileged compute user must reach into it
    base = free_port_base(taken)
    taken.add(base)
    return Platform(kind, tmp, Tierbase(tmp / "home"), base)


def init_platform(p: Platform, btrfs_size: str) -> None:
    log(f"init the {p.kind} platform at {p.tmp} (ports from {p.port_base})")
    os.environ["TIERBASE_PORT_BASE"] = str(p.port_base)  # read once by init, then kept in its settings
    said = p.tb.init(storage=p.kind, btrfs_size=btrfs_size)
    for line in said:
        log(f"  {line}")
    p.tb.start_branch("production")


def teardown(p: Platform) -> None:
    try:
        for line in p.tb.down(purge=True):
            log(f"  [{p.kind}] {line}")
    except BaseException as err:  # keep cleaning the other platform
        log(f"  [{p.kind}] down --purge failed: {err!r}; check `grep {p.tmp} /proc/mounts` and `losetup -a`")
    shutil.rmtree(p.tmp, ignore_errors=True)


def load(p: Platform, scale: int, pgbench: str) -> int:
    """(Re)create database src holding pgbench data of ``scale``; returns its size in bytes."""
    with admin(p.url(db="postgres")) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SRC)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SRC)))
    t0 = time.perf_counter()
    run([pgbench, "-i", "-q", "-s", str(scale), p.url()])
    with admin(p.url(db="postgres")) as conn:
        conn.execute("CHECKPOINT")  # start every method from a clean parent, not from the load's dirty pages
        row = conn.execute("SELECT pg_database_size(%s)", (SRC,)).fetchone()
    size = int(row[0]) if row else 0
    log(f"  [{p.kind}] pgbench -i -s {scale}: {human_bytes(size)} in {time.perf_counter() - t0:.1f}s")
    return size


# -- one measured copy -------------------------------------------------------------------------------
@dataclass
class Sample:
    create_s: float
    first_query_s: float
    added_bytes: int | None  # after the first query; "right after creation" comes from a probe for tierbase
    ready_s: float | None = None  # tierbase: from the create command to the branch's compute accepting connections


def tierbase_sample(p: Platform, name: str, expect: int) -> Sample:
    t0 = time.perf_counter()
    p.tb.create_branch(name)
    t1 = time.perf_counter()
    p.tb.start_branch(name)
    ready = time.perf_counter()
    got = first_query(p.url(name))
    t2 = time.perf_counter()
    check_count(got, expect, name)
    added = p.tb.get_branch(name).get("own_bytes")
    p.tb.delete_branch(name)
    settle(p)
    return Sample(t1 - t0, t2 - t0, added, ready - t0)


def tierbase_probe(p: Platform, name: str) -> int | None:
    """Bytes a branch adds right after creation, before its compute starts (not timed)."""
    p.tb.create_branch(name)
    try:
        return p.tb.get_branch(name).get("own_bytes")
    finally:
        p.tb.delete_branch(name)
        settle(p)


def settle(p: Platform) -> float:
    """Wait until btrfs has really dropped deleted subvolumes; returns the seconds waited.

    `btrfs subvolume delete` returns at once and the cleaner frees the extents
    later, with heavy I/O: without this wait the next measurement pays for it.
    """
    if p.kind != "btrfs":
        return 0.0
    t0 = time.perf_counter()
    root = str(p.tb.branches.provider.driver.root)  # the local provider's volume root
    run(["btrfs", "filesystem", "sync", root])  # commit now: the cleaner otherwise waits up to 30 s for one
    run(["btrfs", "subvolume", "sync", root])
    return time.perf_counter() - t0


def template_sample(p: Platform, name: str, expect: int, strategy: str) -> Sample:
    with admin(p.url(db="postgres")) as conn:  # an open session, as a user at psql would have
        t0 = time.perf_counter()
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY {}").format(
            sql.Identifier(name), sql.Identifier(SRC), sql.SQL(strategy)))
        t1 = time.perf_counter()
        got = first_query(p.url(db=name))
        t2 = time.perf_counter()
        check_count(got, expect, name)
        added = db_size(conn, name)
        drop_db(conn, name)
    return Sample(t1 - t0, t2 - t0, added)


def dump_sample(p: Platform, name: str, expect: int) -> Sample:
    bins = find_binaries()
    env = dict(os.environ, PGPASSWORD=p.tb.branches.provider.password)
    with admin(p.url(db="postgres")) as conn:
        t0 = time.perf_counter()
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dump = subprocess.Popen([bins["pg_dump"], "-Fc", "-d", p.url()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        try:
            restore = subprocess.run([bins["pg_restore"], "--no-owner", "--exit-on-error", "-d", p.url(db=name)],
                                     stdin=dump.stdout, capture_output=True, text=True, env=env)
        finally:
            assert dump.stdout is not None
            dump.stdout.close()
            dump_err = dump.stderr.read().decode(errors="replace") if dump.stderr else ""
            dump.wait()
        if dump.returncode != 0 or restore.returncode != 0:
            raise RuntimeError(f"pg_dump | pg_restore failed: {dump_err.strip()} {restore.stderr.strip()}"[-800:])
        t1 = time.perf_counter()
        got = first_query(p.url(db=name))
        t2 = time.perf_counter()
        check_count(got, expect, name)
        added = db_size(conn, name)
        drop_db(conn, name)
    return Sample(t1 - t0, t2 - t0, added)


def db_size(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
    return int(row[0]) if row else 0


def drop_db(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def check_count(got: int, expect: int, where: str) -> None:
    if got != expect:
        raise RuntimeError(f"the copy {where!r} holds {got} pgbench_accounts rows, expected {expect}")


def measure(method: str, size_mb: int, db_bytes: int, runs: int, sample: Callable[[str], Sample],
            probe: Callable[[str], int | None] | None) -> dict[str, Any]:
    samples: list[Sample] = []
    for i in range(runs):
        name = f"b{size_mb}-{i}-{secrets.token_hex(2)}"
        s = sample(name)
        samples.append(s)
        log(f"  {method} {size_mb} MB run {i + 1}/{runs}: create {ms(s.create_s)} ms, "
            f"first query {ms(s.first_query_s)} ms, {human_bytes(s.added_bytes)}")
    after = [s.added_bytes for s in samples if s.added_bytes is not None]
    added_after = int(pct([float(a) for a in after], 0.5)) if after else None
    added = probe(f"p{size_mb}-{secrets.token_hex(2)}") if probe else added_after
    creates = [s.create_s for s in samples]
    firsts = [s.first_query_s for s in samples]
    readies = [s.ready_s for s in samples if s.ready_s is not None]
    row = {
        "method": method, "size_mb": size_mb, "db_bytes": db_bytes, "runs": runs,
        "create_p50_ms": ms(pct(creates, 0.5)), "create_p95_ms": ms(pct(creates, 0.95)),
        "first_query_p50_ms": ms(pct(firsts, 0.5)), "first_query_p95_ms": ms(pct(firsts, 0.95)),
        "added_bytes": added, "added_bytes_after_first_query": added_after,
        "create_ms": [ms(c) for c in creates], "first_query_ms": [ms(f) for f in firsts],
        "ready_p50_ms": ms(pct(readies, 0.5)) if readies else None,
    }
    log(f"= {method} {size_mb} MB: create p50 {row['create_p50_ms']} ms p95 {row['create_p95_ms']} ms; "
        f"first query p50 {row['first_query_p50_ms']} ms; added {human_bytes(added)}")
    return row


# -- busy parent ---------------------------------------------------------------------------------------
def parse_pgbench(out: str, err: str) -> dict[str, Any]:
    tps = latency = None
    per_second: list[float] = []
    for line in (out + "\n" + err).splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        elif line.startswith("latency average = "):
            latency = float(line.split()[3])
        elif line.startswith("progress: ") and " tps," in line:
            per_second.append(float(line.split(",")[1].split()[0]))
    return {"tps": round(tps, 1) if tps is not None else None, "latency_avg_ms": latency, "tps_per_second": per_second,
            "tps_min_1s": min(per_second) if per_second else None}


def busy_phase(p: Platform, pgbench: str, phase: str, seconds: int, clients: int, interval: float,
               expect: int) -> dict[str, Any]:
    with admin(p.url(db="postgres")) as conn:
        conn.execute("CHECKPOINT")
    args = [pgbench, "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds),
            "-P", "1", p.url()]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    RUNNING.append(proc)
    creates: list[float] = []
    readies: list[float] = []
    firsts: list[float] = []
    names: list[str] = []
    started = time.monotonic()
    try:
        if phase.startswith("branching"):
            time.sleep(min(2.0, seconds / 4))  # let the load settle first
            while proc.poll() is None and time.monotonic() - started < seconds - 1.5:
                tick = time.monotonic()
                name = f"busy-{len(names)}-{secrets.token_hex(2)}"
                t0 = time.perf_counter()
                p.tb.create_branch(name)
                creates.append(time.perf_counter() - t0)
                names.append(name)
                if phase == "branching+start":
                    p.tb.start_branch(name)
                    readies.append(time.perf_counter() - t0)
                    check_count(first_query(p.url(name), BUSY_QUERY), expect // ROWS_PER_SCALE, name)
                    firsts.append(time.perf_counter() - t0)
                time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        out, err = proc.communicate(timeout=seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        RUNNING.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {err.strip()[-800:]}")
    for name in names:  # after the load, so that deletion does not weigh on the TPS being measured
        p.tb.delete_branch(name)
    cleanup = settle(p)
    got = parse_pgbench(out, err)
    got.update(phase=phase, branches=len(names), create_ms=[ms(c) for c in creates],
               ready_ms=[ms(r) for r in readies], first_query_ms=[ms(f) for f in firsts],
               cleanup_s=round(cleanup, 1) if names else None)
    if creates:
        got.update(create_p50_ms=ms(pct(creates, 0.5)), create_p95_ms=ms(pct(creates, 0.95)))
    if readies:
        got.update(ready_p50_ms=ms(pct(readies, 0.5)), ready_p95_ms=ms(pct(readies, 0.95)))
    if firsts:
        got.update(first_query_p50_ms=ms(pct(firsts, 0.5)), first_query_p95_ms=ms(pct(firsts, 0.95)))
    log(f"= busy {phase}: tps {got['tps']} (min 1 s {got['tps_min_1s']}), {len(names)} branches, "
        f"create p50 {got.get('create_p50_ms')} ms p95 {got.get('create_p95_ms')} ms")
    return got


def busy_parent(p: Platform, pgbench: str, seconds: int, clients: int, expect: int) -> list[dict[str, Any]]:
    """Idle, branching, branching + start, idle again: the second idle run shows drift, not branching."""
    log("busy parent: warming up")
    busy_phase(p, pgbench, "warm-up", max(3, seconds // 4), clients, 1.0, expect)
    phases = ["idle (before)", "branching", "branching+start", "idle (after)"]
    return [busy_phase(p, pgbench, phase, seconds, clients, 1.0, expect) for phase in phases]


# -- tables ----------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_notes(raw: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, judged from the numbers of this run."""
    bt = sorted((r for r in raw if r["method"] == "tierbase btrfs"), key=lambda r: r["size_mb"])
    notes: list[str] = []
    if not bt:
        return ["targets: not judged (tierbase btrfs was not measured)"]
    small, large = bt[0], bt[-1]
    p50s = ", ".join(f"{r['create_p50_ms']} ms at {r['size_mb']} MB" for r in bt)
    notes.append(f"target btrfs create p50 < 100 ms: {verdict(all(r['create_p50_ms'] < 100 for r in bt))} ({p50s})")
    if len(bt) > 1:
        a, b = small["create_p50_ms"], large["create_p50_ms"]
        spread = max(a, b) / min(a, b) - 1 if min(a, b) > 0 else math.inf
        notes.append(f"target btrfs create p50 at {small['size_mb']} MB and {large['size_mb']} MB within 30%: "
                     f"{verdict(spread <= 0.30)} (larger/smaller - 1 = {spread:.0%})")
    else:
        notes.append("target btrfs create within 30% across sizes: not measured (one size only)")
    fq50 = all(r["first_query_p50_ms"] < 1000 for r in bt)
    fq95 = all(r["first_query_p95_ms"] < 1000 for r in bt)
    worst = max(r["first_query_p95_ms"] for r in bt)
    fq = "met" if fq95 else ("met at p50, NOT at p95" if fq50 else "NOT met")
    notes.append(f"target btrfs first query < 1 s: {fq} (worst p95 {worst} ms)")
    templ = [r for r in raw if r["method"].startswith("CREATE DATABASE") and r["size_mb"] == large["size_mb"]]
    if templ:
        fastest = min(templ, key=lambda r: r["create_p50_ms"])
        ratio = fastest["create_p50_ms"] / large["create_p50_ms"] if large["create_p50_ms"] else math.inf
        at = f"at {large['size_mb']} MB" + ("" if large["size_mb"] >= 1000 else " (the largest size measured)")
        notes.append(f"target btrfs >= 20x faster than CREATE DATABASE TEMPLATE {at}: {verdict(ratio >= 20)} "
                     f"({ratio:.0f}x against the faster strategy, {fastest['method']} p50 "
                     f"{fastest['create_p50_ms']} ms)")
    added = [r["added_bytes"] for r in bt]
    detail = ", ".join(f"{human_bytes(r['added_bytes'])} at {r['size_mb']} MB" for r in bt)
    after = ", ".join(human_bytes(r.get("added_bytes_after_first_query")) for r in bt)
    notes.append(f"target btrfs < 1 MiB added: {verdict(None if None in added else all(a < MiB for a in added))} "
                 f"({detail} right after creation; {after} once started and queried)")
    return notes


def ready_notes(raw: list[dict[str, Any]]) -> list[str]:
    parts = [f"{r['ready_p50_ms']} ms at {r['size_mb']} MB ({r['method']})" for r in raw if r.get("ready_p50_ms")]
    if not parts:
        return []
    return ["tierbase, create + start until the compute accepts connections, p50: " + "; ".join(parts)
            + ". The rest of the first query is connecting and the full scan itself."]


def creation_table(raw: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    rows = [[r["method"], f"{r['size_mb']} MB", human_bytes(r["db_bytes"]), r["create_p50_ms"], r["create_p95_ms"],
             r["first_query_p50_ms"], r["first_query_p95_ms"], human_bytes(r["added_bytes"]),
             human_bytes(r["added_bytes_after_first_query"])]
            for r in sorted(raw, key=lambda r: (r["size_mb"], METHODS.index(r["method"])))]
    notes = [
        f"{runs} runs per method and size; p95 interpolated between the closest ranks (so close to the maximum).",
        "create: wall time of the command making the copy. tierbase: `Tierbase.create_branch` in-process "
        "(CHECKPOINT on the running parent, then the snapshot or pg_basebackup, then metadata); "
        "CREATE DATABASE: the statement on an already open session; dump: CREATE DATABASE + "
        "`pg_dump -Fc | pg_restore --no-owner`.",
        "first query: from the create command to `SELECT count(*) FROM pgbench_accounts` answered on the copy "
        "(tierbase: + start the branch's compute + connect; others: + connect).",
        "added on disk: tierbase btrfs = exclusive bytes of the new subvolume (`btrfs filesystem du`); tierbase "
        "copy = allocated bytes of the new data dir (the whole cluster); others = `pg_database_size` of the new "
        "database. 'after first query' is the same, measured after the copy's compute started and answered.",
        "Parent kept running throughout. CREATE DATABASE and pg_dump ran on the copy platform's production "
        "compute: plain Postgres on a plain directory of the machine's root filesystem.",
        f"Sizes are pgbench scales (about {MB_PER_SCALE} MB each); 'database' is pg_database_size of the source.",
        *ready_notes(raw),
        *target_notes(raw),
    ]
    return {"title": TABLE_TITLE,
            "columns": ["method", "size", "database", "create p50 (ms)", "create p95 (ms)", "first query p50 (ms)",
                        "first query p95 (ms)", "added on disk", "added after first query"],
            "rows": rows, "notes": notes}


def busy_table(busy: list[dict[str, Any]], size_mb: int, clients: int, seconds: int) -> dict[str, Any]:
    rows = [[b["phase"], b["tps"], b["tps_min_1s"], b["latency_avg_ms"], b["branches"] or "-",
             b.get("create_p50_ms"), b.get("create_p95_ms"), b.get("ready_p50_ms"), b.get("first_query_p50_ms"),
             b.get("first_query_p95_ms"), b.get("cleanup_s")]
            for b in busy]
    idles = [b["tps"] for b in busy if b["phase"].startswith("idle") and b["tps"] is not None]
    idle = sum(idles) / len(idles) if idles else None
    notes = [f"pgbench -c {clients} -T {seconds} (TPC-B-like, read-write) on production's {size_mb} MB database, "
             "after an untimed warm-up; while 'branching' runs, a new branch of production every ~1 s; branches "
             "deleted after each load ended."]
    for b in busy:
        if idle and b["phase"].startswith("branching") and b["tps"] is not None:
            notes.append(f"{b['phase']}: parent TPS {b['tps'] / idle - 1:+.0%} against the mean of the idle runs "
                         f"({idle:.0f}); lowest 1-second TPS {b['tps_min_1s']}.")
    notes.append("create includes the CHECKPOINT on the busy parent, which flushes the pages dirtied since the "
                 "previous one; 'branching+start' also starts each branch's compute and runs a light first query "
                 f"(`{BUSY_QUERY}`; a full scan of 1 GB on the same 2 cores would measure the scan).")
    notes.append("cleanup after: deleting the phase's branches returns at once, but btrfs frees their extents in the "
                 "background; the time until `btrfs subvolume sync` returned, waited out before the next phase so "
                 "that no phase pays for the previous one's cleanup.")
    return {"title": BUSY_TITLE,
            "columns": ["phase", "parent TPS", "min 1-s TPS", "latency avg (ms)", "branches", "create p50 (ms)",
                        "create p95 (ms)", "ready p50 (ms)", "first query p50 (ms)", "first query p95 (ms)",
                        "cleanup after (s)"],
            "rows": rows, "notes": notes}


def machine() -> str:
    cpu = "unknown CPU"
    with suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    mem = 0
    with suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem = int(next(ln.split()[1] for ln in lines if ln.startswith("MemTotal"))) * 1024
    got = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", "/tmp"], capture_output=True, text=True)
    fs = got.stdout.strip() or "an unknown filesystem"
    return f"{os.cpu_count()} cores {cpu}, {human_bytes(mem)} RAM, /tmp on {fs}, Linux {os.uname().release}"


METHODS = ["tierbase btrfs", "tierbase copy", "CREATE DATABASE TEMPLATE (FILE_COPY)",
           "CREATE DATABASE TEMPLATE (WAL_LOG)", "pg_dump -Fc | pg_restore"]
RUNNING: list[subprocess.Popen[str]] = []


# -- main --------------------------------------------------------------------------------------------------
Plan = dict[str, tuple[Callable[[str], Sample], Callable[[str], int | None] | None]]


def method_plan(bt: Platform, cp: Platform, expect: int) -> Plan:
    """For each method: one measured run (given a fresh copy name), and the bytes probe if it needs one."""
    return {
        "tierbase btrfs": (lambda n: tierbase_sample(bt, n, expect), lambda n: tierbase_probe(bt, n)),
        "tierbase copy": (lambda n: tierbase_sample(cp, n, expect), lambda n: tierbase_probe(cp, n)),
        "CREATE DATABASE TEMPLATE (FILE_COPY)": (lambda n: template_sample(cp, n, expect, "FILE_COPY"), None),
        "CREATE DATABASE TEMPLATE (WAL_LOG)": (lambda n: template_sample(cp, n, expect, "WAL_LOG"), None),
        "pg_dump -Fc | pg_restore": (lambda n: dump_sample(cp, n, expect), None),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="10,1000", help="comma-separated database sizes (default 10,1000)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per method and size (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS / "branching.json")
    ap.add_argument("--busy-seconds", type=int, default=20, help="pgbench -T of each busy-parent phase; 0 skips")
    ap.add_argument("--busy-clients", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--no-report", action="store_true", help="do not render docs/benchmarks.md afterwards")
    ap.add_argument("--retable", action="store_true",
                    help="measure nothing: rebuild the tables of --out from its raw samples (after a change of notes)")
    args = ap.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes_mb.split(",") if s.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.sizes or args.runs < 1:
        ap.error(f"bad --methods {unknown}" if unknown else "need at least one size and one run")
    return args


def build_tables(raw: list[dict[str, Any]], busy: list[dict[str, Any]], busy_clients: int,
                 busy_seconds: int) -> list[dict[str, Any]]:
    tables = [creation_table(raw, max(r["runs"] for r in raw))]
    if busy:
        tables.append(busy_table(busy, max(r["size_mb"] for r in raw), busy_clients, busy_seconds))
    return tables


def retable(args: argparse.Namespace) -> int:
    doc = json.loads(args.out.read_text())
    busy = doc.get("busy") or []
    meta = doc.get("meta", {})
    doc["tables"] = build_tables(doc["raw"], busy, meta.get("busy_clients", args.busy_clients),
                                 meta.get("busy_seconds", args.busy_seconds))
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"rebuilt the tables of {args.out}")
    if not args.no_report:
        log(f"wrote {render_all()}")
    return 0


def on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retable:
        return retable(args)
    if os.geteuid() != 0:
        print("Error: bench/branching.py must run as root: the btrfs platform loop-mounts an image file. "
              "Run it with sudo (computes still run as an unprivileged user).", file=sys.stderr)
        return 2
    if not shutil.which("mkfs.btrfs"):
        print("Error: mkfs.btrfs was not found. Install btrfs-progs.", file=sys.stderr)
        return 2
    pgbench = pgbench_bin()
    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())  # other work on the machine skews the numbers
    btrfs_size = f"{max(4, math.ceil(max(args.sizes) / 1024 * 10))}G"  # sparse: costs only what is written
    taken: set[int] = set()
    platforms = {k: make_platform(k, taken) for k in ("btrfs", "copy")}
    raw: list[dict[str, Any]] = []
    busy: list[dict[str, Any]] = []
    try:
        for p in platforms.values():
            init_platform(p, btrfs_size)
        bt, cp = platforms["btrfs"], platforms["copy"]
        for size_mb in args.sizes:
            scale = max(1, round(size_mb / MB_PER_SCALE))
            expect = scale * ROWS_PER_SCALE
            log(f"size {size_mb} MB: pgbench scale {scale}")
            db_bytes = load(bt, scale, pgbench)
            load(cp, scale, pgbench)
            plan = method_plan(bt, cp, expect)
            for method in args.methods:
                sample, probe = plan[method]
                raw.append(measure(method, size_mb, db_bytes, args.runs, sample, probe))
            if size_mb == max(args.sizes) and args.busy_seconds > 0:
                busy = busy_parent(bt, pgbench, args.busy_seconds, args.busy_clients, expect)
        tables = build_tables(raw, busy, args.busy_clients, args.busy_seconds)
        bins = find_binaries()
        version = run([bins["postgres"], "--version"]).stdout.strip()
        doc = {
            "title": "Branching",
            "tables": tables,
            "meta": {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(),
                "postgres": version,
                "cmd": shlex.join(["python", "bench/branching.py", *(sys.argv[1:] if argv is None else argv)]),
                "requires": "root (loop-mounts a btrfs image); computes run as an unprivileged user",
                "duration_s": round(time.time() - started),
                "load_average_at_start": load_at_start,
                "busy_clients": args.busy_clients,
                "busy_seconds": args.busy_seconds,
            },
            "raw": raw,
            "busy": busy,
        }
        write_results(doc, args.out, report=not args.no_report)
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        for proc in RUNNING:
            with suppress(OSError):
                proc.kill()
        for p in platforms.values():
            log(f"tearing down the {p.kind} platform")
            teardown(p)


if __name__ == "__main__":
    sys.exit(main())
