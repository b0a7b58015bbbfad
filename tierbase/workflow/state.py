"""The five states, the transition table, and the state file as a projection of the control plane.

``.tierbase/workflow-state.json`` is never the truth: the control plane's
history is (``flow_record`` / ``flow_history``). The file is what
:func:`project` makes of that history, carries its digest, and is checked
against it before every transition; a file that differs was edited by hand.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from .history import digest
from .validate import problems

SCHEMA_ID = "https://tierbase.dev/schemas/workflow-state.schema.json"
STATE_FILE = Path(".tierbase") / "workflow-state.json"


class FlowState(StrEnum):
    SCAFFOLD_COMPLETE = "scaffold-complete"
    FEATURE_CLAIMED = "feature-claimed"
    PR_READY = "pr-ready"
    CI_GREEN = "ci-green"
    MERGED = "merged"


class Transition(StrEnum):
    SCAFFOLD = "scaffold"
    CLAIM = "claim"
    READY = "ready"
    CI = "ci"
    MERGE = "merge"
    ABANDON = "abandon"


S = FlowState
#: (transition, from state) -> to state. Anything not listed is refused.
TRANSITIONS: dict[tuple[Transition, FlowState | None], FlowState] = {
    (Transition.SCAFFOLD, None): S.SCAFFOLD_COMPLETE,
    (Transition.SCAFFOLD, S.SCAFFOLD_COMPLETE): S.SCAFFOLD_COMPLETE,   # init again: re-checks, no-op
    (Transition.CLAIM, S.SCAFFOLD_COMPLETE): S.FEATURE_CLAIMED,
    (Transition.CLAIM, S.MERGED): S.FEATURE_CLAIMED,
    (Transition.READY, S.FEATURE_CLAIMED): S.PR_READY,
    (Transition.READY, S.PR_READY): S.PR_READY,         # new commits after a red ci: prepare again
    (Transition.READY, S.CI_GREEN): S.PR_READY,         # new commits after green: the evidence is stale
    (Transition.CI, S.PR_READY): S.CI_GREEN,
    (Transition.CI, S.CI_GREEN): S.CI_GREEN,
    (Transition.MERGE, S.CI_GREEN): S.MERGED,
    (Transition.ABANDON, S.FEATURE_CLAIMED): S.SCAFFOLD_COMPLETE,
    (Transition.ABANDON, S.PR_READY): S.SCAFFOLD_COMPLETE,
    (Transition.ABANDON, S.CI_GREEN): S.SCAFFOLD_COMPLETE,
}
IN_FLIGHT = (S.FEATURE_CLAIMED, S.PR_READY, S.CI_GREEN)


def next_state(transition: Transition, current: FlowState | None) -> FlowState | None:
    return TRANSITIONS.get((transition, current))


def allowed_from(transition: Transition) -> list[str]:
    return [str(frm) for (t, frm) in TRANSITIONS if t is transition and frm is not None]


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def effective(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events that change something: refusals are history (and audit), not state."""
    return [e for e in events if not str(e["transition"]).endswith("-refused")]


def workspace_pointer(events: list[dict[str, Any]]) -> str | None:
    """The feature a workspace's history says is current (claimed or just merged), if any."""
    for e in reversed(effective(events)):
        if e["transition"] in (Transition.CLAIM, Transition.MERGE):
            return str(e["evidence"]["feature"])
        if e["transition"] == Transition.ABANDON:
            return None
    return None


def project(*, workspace: str, project_name: str, key: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The state file that the history ``events`` of ``key`` (a feature, or the workspace itself) means."""
    evs = effective(events)
    feature = None if key == workspace else key
    doc: dict[str, Any] = {
        "$schema": SCHEMA_ID, "version": 1, "workspace": workspace, "project": project_name,
        "history": key, "feature": feature, "state": evs[-1]["state"] if evs else None,
        "events": len(evs), "digest": digest(evs),
        "updated_at": iso(evs[-1]["at"]) if evs else None, "updated_by": evs[-1]["actor"] if evs else None,
        "transitions": {}, "tdd": None,
    }
    for e in evs:
        name, ev = str(e["transition"]), dict(e["evidence"])
        stamp = {"at": iso(e["at"]), "by": e["actor"]}
        if feature is None:
            if name == Transition.SCAFFOLD:
                doc["transitions"]["scaffold"] = {**ev, **stamp}
            continue
        if name == Transition.CLAIM:
            doc["transitions"] = {"claim": {**ev, **stamp}}
        elif name in (Transition.READY, Transition.CI, Transition.MERGE, Transition.ABANDON):
            if name == Transition.READY:
                doc["transitions"] = {k: v for k, v in doc["transitions"].items() if k == "claim"}
            doc["transitions"][name] = {**ev, **stamp}
        elif name.startswith("tdd-"):
            doc["tdd"] = fold_tdd(doc["tdd"], name, ev, stamp)
    return doc


def fold_tdd(tdd: dict[str, Any] | None, name: str, ev: dict[str, Any], stamp: dict[str, str]) -> dict[str, Any]:
    """One TDD event folded into the TDD part of the projection."""
    t: dict[str, Any] = tdd if tdd is not None else {"roles": {}, "artifacts": {}, "items": {}, "baselines": {}}
    if name == "tdd-enable":
        t["enabled"] = {**stamp}
    elif name == "tdd-assign":
        t["roles"][ev["role"]] = ev["principal"]
    elif name == "tdd-submit":
        t["artifacts"][ev["artifact"]] = {"sha256": ev["sha256"], "submitted": stamp, "approved": None}
    elif name == "tdd-approve":
        art = t["artifacts"][ev["artifact"]]
        art["approved"] = {"sha256": ev["sha256"], **stamp}
        if ev["artifact"] == "test-list":
            # a re-approved test list re-baselines the tests it names (RED hashes give way)
            t["baselines"] = dict(ev.get("fingerprints", {}))
            t["items"] = {i: v for i, v in t["items"].items() if i in ev.get("items", [])}
    elif name == "tdd-red":
        t["items"][ev["item"]] = {"test": ev["test"], "red": {"fingerprint": ev["fingerprint"], **stamp},
                                  "green": None}
        t["baselines"][ev["test"]] = ev["fingerprint"]
    elif name == "tdd-green":
        for item in ev["items"]:
            if item in t["items"]:
                t["items"][item]["green"] = {"sha": ev.get("sha"), **stamp}
    return t


# -- the file ------------------------------------------------------------------------------
def state_path(repo: Path) -> Path:
    return repo / STATE_FILE


def read_raw(repo: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The state file as written, and what is wrong with it (empty: valid against the schema)."""
    path = state_path(repo)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None, ["the state file does not exist"]
    except (OSError, ValueError) as err:
        return None, [f"the state file is not JSON: {err}"]
    if not isinstance(doc, dict):
        return None, ["the state file is not a JSON object"]
    return doc, problems("workflow-state", doc)


def write_state(repo: Path, doc: dict[str, Any]) -> Path:
    """Validate, then write atomically: a temporary file, fsync, rename, fsync of the directory."""
    bad = problems("workflow-state", doc)
    if bad:  # a bug in the kit, never the user's doing: refuse to write a file the gates would reject
        raise ValueError("refusing to write an invalid state file: " + "; ".join(bad))
    path = state_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".workflow-state.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path
