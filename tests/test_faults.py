"""The fault harness (bench/faults.py) at CI size: 10 random kill -9 trials of the real service, 0 failures.

Each trial kills `python -m tierbase.service` at a random moment of a create / delete / reset /
promote / rollback through the API (or kills production's compute under the writer's load), restarts
it and runs every check of the harness: no half-made branch, orphan or missing volume, stray
postgres, running promotion, lost acknowledged row, unresolvable route, unaudited change, and
`audit verify` ok. `python bench/faults.py --trials 100` is the full run (docs/reliability.md).
"""

from __future__ import annotations

import os

from bench.faults import CHECKS, run

from .conftest import needs_root_btrfs

pytestmark = needs_root_btrfs


def test_ten_random_kills_leave_a_sound_platform() -> None:
    seed = int(os.environ.get("TIERBASE_FAULTS_SEED", "11"))
    summary = run(10, seed, say=False)
    assert summary["trials"] == 10
    assert summary["killed_mid_operation"] >= 3  # the kills land inside operations, not only between them
    assert summary["failed_trials"] == [], summary["failed_trials"]
    assert set(summary["failures"]) == set(CHECKS) and not any(summary["failures"].values())
    assert summary["rows_acknowledged"] > 0
