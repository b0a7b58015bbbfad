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
from ..errors import InvalidInput, Refused
from ..names import check_name


class FlowHistory:
    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, feature: str, transition: str, state: str, actor: str, evidence: dict[str, Any]) -> dict[str, Any]:
        check_name(feature, "feature")
        with self.store.write() as db:
            last = db.execute("SELECT state FROM flow_events WHERE feature=? AND transition NOT LIKE '%-refused' "
                              "ORDER BY id DESC LIMIT 1", (feature,)).fetchone()
            check_transition(feature, transition, state, last[0] if last else None)
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


def check_transition(feature: str, transition: str, state: str, current: str | None) -> None:
    """The control plane keeps the machine honest: a feature's history only takes the table's transitions.

    Events that are not transitions (refusals, TDD records) must leave the state as it is.
    Workspace histories (``ws-*``) point at features and are checked only for known states.
    """
    from .state import TRANSITIONS, FlowState, Transition

    if state not in {s.value for s in FlowState}:
        raise InvalidInput(f"{state!r} is not a workflow state", "Use the tierbase flow commands")
    if feature.startswith("ws-"):
        return
    if transition not in {t.value for t in Transition}:
        if current is not None and state != current:
            raise Refused(f"{transition!r} cannot change the state of {feature!r} ({current} -> {state})",
                          "Only the flow transitions change a feature's state")
        return
    if current is None and transition == Transition.CLAIM:
        current = FlowState.SCAFFOLD_COMPLETE.value  # a feature's history begins with its claim
    allowed = TRANSITIONS.get((Transition(transition), FlowState(current) if current else None))
    if allowed is None or allowed.value != state:
        raise Refused(f"{transition!r} is not a transition from {current or 'nothing'} to {state} for {feature!r}",
                      "Use the tierbase flow commands; the control plane refuses skipped gates")


def digest(events: list[dict[str, Any]]) -> str:
    """A digest of the history that a state file must carry to be believed."""
    canon = json.dumps([[e["id"], e["transition"], e["state"], e["actor"], e["evidence"]] for e in events],
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
