"""What disk-full isolation costs: btrfs quotas off, simple quotas (squota) with the features group, full qgroups.

For each mode, on its own fresh loop-mounted btrfs image: a pgbench-initialised cluster in a
"production" subvolume (running), then
  - snapshot latency: N snapshots of the running cluster (into the features group where there is one),
    and the deletion of each (with --commit-after);
  - pgbench TPS on production and on a feature snapshot (4 clients, tpcb-like);
  - how fast one feature can write (MB/s): what a watermark poller would have to outrun;
  - whether the group's accounting still holds after the snapshots (full qgroups go inconsistent).

    python bench/space.py --out bench/results/space.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, log, ms, pct  # noqa: E402
from tierbase.compute import find_binaries  # noqa: E402
from tierbase.storage import quota  # noqa: E402

MODES = ("off", "squota", "qgroup")
PG_USER = "postgres"


def sh(*args: str, user: bool = False, check: bool = True, **kw: Any) -> str:
    cmd = ["runuser", "-u", PG_USER, "--", *args] if user else list(args)
    got = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and got.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {got.stderr.strip()[-400:]}")
    return str(got.stdout)


class Pool:
    def __init__(self, base: Path, mode: str, size: str) -> None:
        self.base, self.mode = base, mode
        self.img, self.root = base / f"{mode}.img", base / mode
        self.bins = find_binaries().bindir
        self.root.mkdir()
        with open(self.img, "wb") as fh:
            fh.truncate(int(size.rstrip("G")) * 1024 ** 3)
        sh("mkfs.btrfs", "-q", "-f", str(self.img))
        sh("mount", "-o", "loop,user_subvol_rm_allowed,noatime", str(self.img), str(self.root))
        shutil.chown(self.root, PG_USER, PG_USER)
        self.group: list[str] = []
        if mode == "squota":
            quota.enable(self.root)
            self.group = ["-i", quota.FEATURES_QGROUP]
        elif mode == "qgroup":
            sh("btrfs", "quota", "enable", str(self.root))
            sh("btrfs", "qgroup", "create", quota.FEATURES_QGROUP, str(self.root))
            self.group = ["-i", quota.FEATURES_QGROUP]
        if self.group:
            quota.set_limit(self.root, 8 * 1024 ** 3)

    def setup(self) -> None:
        self.prod = self.root / "production"
        sh("btrfs", "subvolume", "create", str(self.prod), user=True)
        sh(str(self.bins / "initdb"), "-D", str(self.prod), "-A", "trust", "-U", "postgres", user=True)
        self.sock = self.base / f"sock-{self.mode}"
        self.sock.mkdir()
        shutil.chown(self.sock, PG_USER, PG_USER)
        self.port = free_port()
        self.start(self.prod, self.port)
        sh(str(self.bins / "pgbench"), "-i", "-q", "-s", "10", "-h", str(self.sock), "-p", str(self.port),
           "postgres", user=True)

    def start(self, datadir: Path, port: int) -> None:
        (datadir / "postmaster.pid").unlink(missing_ok=True)
        sh(str(self.bins / "pg_ctl"), "start", "-w", "-s", "-D", str(datadir), "-l", str(self.sock / f"{port}.log"),
           "-o", f"-p {port} -k {self.sock} -c listen_addresses=''", user=True)

    def stop(self, datadir: Path) -> None:
        sh(str(self.bins / "pg_ctl"), "stop", "-s", "-m", "fast", "-D", str(datadir), user=True, check=False)

    def psql(self, port: int, sql: str) -> str:
        return sh(str(self.bins / "psql"), "-h", str(self.sock), "-p", str(port), "-AtXq", "-c", sql, "postgres",
                  user=True)

    def snapshot(self, name: str) -> tuple[float, Path]:
        self.psql(self.port, "CHECKPOINT")
        dst = self.root / name
        t0 = time.perf_counter()
        sh("btrfs", "subvolume", "snapshot", *self.group, str(self.prod), str(dst), user=True)
        return time.perf_counter() - t0, dst

    def delete(self, path: Path) -> float:
        t0 = time.perf_counter()
        sh("btrfs", "subvolume", "delete", "-c", str(path), user=True)
        return time.perf_counter() - t0

    def tps(self, port: int, seconds: int) -> float:
        out = sh(str(self.bins / "pgbench"), "-c", "4", "-j", "2", "-T", str(seconds), "-h", str(self.sock), "-p",
                 str(port), "postgres", user=True)
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:  # every cluster we started
            self.stop(d)
        sh("umount", str(self.root), check=False)
        self.img.unlink(missing_ok=True)


def measure(base: Path, mode: str, snaps: int, seconds: int) -> dict[str, Any]:
    log(f"mode {mode}: setting up")
    pool = Pool(base, mode, "6G")
    try:
        pool.setup()
        made = [pool.snapshot(f"s{i}") for i in range(snaps)]
        snap_s = [t for t, _ in made]
        del_s = [pool.delete(p) for _, p in made]
        _, feat = pool.snapshot("feature")
        feat_port = free_port()
        pool.start(feat, feat_port)
        prod_tps = pool.tps(pool.port, seconds)
        feat_tps = pool.tps(feat_port, seconds)
        t0 = time.perf_counter()
        pool.psql(feat_port, "CREATE TABLE big AS SELECT g, md5(g::text) || md5(random()::text) AS pad "
                             "FROM generate_series(1, 2000000) g; CHECKPOINT")
        wrote = int(pool.psql(feat_port, "SELECT pg_total_relation_size('big')").strip())
        write_s = time.perf_counter() - t0
        group = quota.usage(pool.root) if mode != "off" else None
        consistent = None
        if mode != "off":
            flag = Path("/sys/fs/btrfs") / quota.fsid(pool.root) / "qgroups" / "inconsistent"
            with contextlib.suppress(OSError):
                consistent = flag.read_text().strip() == "0"
        out = {
            "mode": mode,
            "snapshot_ms": {"p50": ms(statistics.median(snap_s)), "p95": ms(pct(snap_s, 0.95)), "n": snaps},
            "delete_ms": {"p50": ms(statistics.median(del_s)), "p95": ms(pct(del_s, 0.95)), "n": snaps},
            "tps_production": round(prod_tps, 1), "tps_feature": round(feat_tps, 1),
            "feature_write_mb_s": round(wrote / 1024 ** 2 / write_s, 1),
            "features_group_bytes": group.used if group else None,
            "feature_table_bytes": wrote,
            "accounting_consistent": consistent,
        }
        log(f"mode {mode}: {out}")
        return out
    finally:
        pool.close()


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "| quotas | snapshot p50 / p95 | delete (commit) p50 | pgbench TPS production | TPS feature | "
        "feature writes | features' count after the snapshots |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        count = {None: "-", True: "exact", False: "INCONSISTENT (nothing enforced)"}[r["accounting_consistent"]]
        lines.append(f"| {r['mode']} | {r['snapshot_ms']['p50']} / {r['snapshot_ms']['p95']} ms | "
                     f"{r['delete_ms']['p50']} ms | {r['tps_production']} | {r['tps_feature']} | "
                     f"{r['feature_write_mb_s']} MB/s | {count} |")
    m = doc["meta"]
    lines += ["", f"{m['date']}, {m['machine']}, Linux {m['kernel']}; pgbench -c 4 -j 2, scale 10, on a 6 GiB "
              "loop image each; one feature writing `CREATE TABLE AS` 2M rows."]
    return "\n".join(lines)


def write_doc(doc: dict[str, Any], path: Path) -> None:
    text = path.read_text()
    start, end = "<!-- space:begin -->", "<!-- space:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{markdown(doc)}\n{end}{tail}")
    log(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=20, help="pgbench duration per run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "space.json"))
    ap.add_argument("--doc", default=None, help="rewrite the table between the space markers of this file")
    ap.add_argument("--render", action="store_true", help="only render --out into --doc")
    args = ap.parse_args()
    if args.render:
        write_doc(json.loads(Path(args.out).read_text()), Path(args.doc))
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: it loop-mounts btrfs images")
    base = Path(tempfile.mkdtemp(prefix="tierbase-space-", dir="/tmp"))
    base.chmod(0o711)
    try:
        results = [measure(base, m, args.snapshots, args.seconds) for m in MODES]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, shared",
                    "cmd": " ".join(sys.argv), "kernel": os.uname().release}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out}")
    if args.doc:
        write_doc(doc, Path(args.doc))


if __name__ == "__main__":
    main()
