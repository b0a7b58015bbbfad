"""The control plane's authoritative history of each feature's workflow transitions.

The app repo's ``.tierbase/workflow-state.json`` is a projection of this
history and carries its digest; a state file whose digest does not match the
history was edited by hand and is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ..control.store import Store
from ..names import check_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS flow_events (
    id          INTEGER PRIMARY KEY,
    feature     TEXT NOT NULL,
    transition  TEXT NOT NULL,
    state       TEXT NOT NULL,      -- the state after the transition
    actor       TEXT NOT NULL,
    at          REAL NOT NULL,
    evidence    TEXT NOT NULL       -- JSON
);
CREATE INDEX IF NOT EXISTS flow_events_feature ON flow_events(feature, id);
"""


class FlowHistory:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)

    def record(self, feature: str, transition: str, state: str, actor: str, evidence: dict[str, Any]) -> dict[str, Any]:
        check_name(feature, "feature")
        with self.store.write() as db:
            db.execute("INSERT INTO flow_events(feature, transition, state, actor, at, evidence) VALUES(?,?,?,?,?,?)",
                       (feature, transition, state, actor, time.time(), json.dumps(evidence, sort_keys=True)))
        return self.summary(feature)

    def events(self, feature: str) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT id, feature, transition, state, actor, at, evidence FROM flow_events "
                                     "WHERE feature=? ORDER BY id", (feature,))
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in rows]

    def summary(self, feature: str) -> dict[str, Any]:
        events = self.events(feature)
        return {"feature": feature, "state": events[-1]["state"] if events else None, "events": events,
                "digest": digest(events)}


def digest(events: list[dict[str, Any]]) -> str:
    """A digest of the history that a state file must carry to be believed."""
    canon = json.dumps([[e["id"], e["transition"], e["state"], e["actor"], e["evidence"]] for e in events],
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
