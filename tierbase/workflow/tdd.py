"""The opt-in TDD layer: six roles, four schema-validated artifacts, RED and GREEN recorded by tierbase.

It fires between feature-claimed and pr-ready and calls down into the flow
(branches, history), never up. Every TDD event lives in the feature's
control-plane history (so the state file projects it and cannot fake it);
artifacts live under ``.tierbase/tdd/<feature>/`` and are trusted only by
content hash: an approval records the hash it approved, a later change is
drift. Tests are trusted by fingerprint (their AST): recorded at RED and at
test-list approval, a changed or deleted test fails the next gate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInput, PolicyDenied, TierbaseError
from . import testrun
from .constants import ARTIFACTS, ROLES
from .errors import Failure
from .flow import result
from .state import IN_FLIGHT
from .validate import problems
from .workspace import Current, Workspace

ORDER = list(ARTIFACTS)
#: pairs of roles one principal may not hold together on a feature
CONFLICTS = (("navigator", "driver"), ("test-strategist", "driver"))
EPHEMERAL_TTL = "1h"


def _tdd(cur: Current) -> dict[str, Any] | None:
    t = cur.doc.get("tdd")
    return t if t and t.get("enabled") else None


def artifact_path(ws: Workspace, feature: str, artifact: str) -> Path:
    return ws.kit_path("tdd", feature, f"{artifact}.json")


def file_sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def load_artifact(ws: Workspace, feature: str, artifact: str) -> dict[str, Any]:
    return dict(json.loads(artifact_path(ws, feature, artifact).read_text()))


def _begin(ws: Workspace, gate: str, *, enabled: bool = True) -> tuple[Current, dict[str, Any]]:
    cur = ws.current(gate)
    if cur.state not in IN_FLIGHT or cur.feature is None:
        ws.refuse(gate, [Failure("no-feature", f"the TDD layer works on a claimed feature; the state is {cur.state}",
                                 "Claim one first: `tierbase flow claim FEATURE`")], cur)
    t = _tdd(cur)
    if enabled and t is None:
        ws.refuse(gate, [Failure("tdd-not-enabled", f"TDD is not enabled for {cur.feature!r}",
                                 "Enable it: `tierbase tdd enable`")], cur)
    return cur, t or {}


def _done(ws: Workspace, cur: Current, gate: str, said: list[str], **extra: Any) -> dict[str, Any]:
    doc = ws.sync()
    out = result(gate, cur.state, doc, said, **extra)
    out["evidence"] = doc.get("tdd") or {}
    return out


# -- enable, assign ----------------------------------------------------------------------
def enable(ws: Workspace) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-enable", enabled=False)
    if t:
        return _done(ws, cur, "tdd-enable", [f"TDD was already enabled for {cur.feature!r}"])
    ws.platform.tdd_command(cur.key, "enable")
    return _done(ws, cur, "tdd-enable", [f"TDD enabled for {cur.feature!r}: next, assign the six roles "
                                         "(`tierbase tdd assign ROLE PRINCIPAL`)"])


def assign(ws: Workspace, role: str, principal: str) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-assign")
    failures = []
    if role not in ROLES:
        failures.append(Failure("unknown-role", f"{role!r} is not a TDD role", f"Use one of: {', '.join(ROLES)}"))
    if ws.me.get("base_role") == "agent":
        failures.append(Failure("agent-cannot-assign", "agents cannot hand out TDD roles",
                                "A developer or platform engineer assigns the roles"))
    roles = {**t["roles"], role: principal}
    for a, b in CONFLICTS:
        if roles.get(a) is not None and roles.get(a) == roles.get(b) and role in (a, b):
            failures.append(Failure("role-conflict", f"{principal!r} cannot be both {a} and {b} on a feature",
                                    "Give the role to another principal"))
    if failures:
        ws.refuse("tdd-assign", failures, cur)
    ws.platform.tdd_command(cur.key, "assign", role=role, principal=principal)
    return _done(ws, cur, "tdd-assign", [f"{principal!r} is the {role} of {cur.feature!r}"])


def _holds(ws: Workspace, t: dict[str, Any], role: str) -> Failure | None:
    me = str(ws.me["name"])
    if t["roles"].get(role) != me:
        return Failure("not-your-role", f"{me!r} is not the {role} of this feature "
                       f"(the {role} is {t['roles'].get(role) or 'not assigned'})",
                       f"The {role} does this; roles are assigned with `tierbase tdd assign`")
    others = [b if a == role else a for a, b in CONFLICTS if role in (a, b)]
    clash = [o for o in others if t["roles"].get(o) == me]
    if clash:
        return Failure("role-conflict", f"{me!r} is also the {clash[0]}: one principal cannot be both",
                       "Reassign one of the roles")
    return None


# -- artifacts -----------------------------------------------------------------------------
def gate_problems(ws: Workspace, cur: Current, t: dict[str, Any], upto: str | None = None) -> list[Failure]:
    """The artifact gates before ``upto`` (all four if None) that are not approved, or drifted since."""
    out = []
    for name in ORDER[:ORDER.index(upto)] if upto else ORDER:
        art = t["artifacts"].get(name)
        if art is None or art.get("approved") is None:
            out.append(Failure("gate-open", f"the {name} gate is not approved yet",
                               f"Gates go in order: {' -> '.join(ORDER)} -> cycles; "
                               f"`tierbase tdd submit {name} FILE`, then `tierbase tdd approve {name}`"))
        elif file_sha(artifact_path(ws, str(cur.feature), name)) != art["approved"]["sha256"]:
            out.append(Failure("artifact-drift", f"{name}.json changed after it was approved",
                               f"Submit it again and have it approved: `tierbase tdd submit {name} FILE`"))
    return out


def submit(ws: Workspace, artifact: str, source: Path) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-submit")
    if artifact not in ARTIFACTS:
        ws.refuse("tdd-submit", [Failure("unknown-artifact", f"{artifact!r} is not a TDD artifact",
                                         f"Use one of: {', '.join(ARTIFACTS)}")], cur)
    failures = [f for f in [_holds(ws, t, ARTIFACTS[artifact])] if f]
    failures += gate_problems(ws, cur, t, upto=artifact)
    try:
        raw = source.read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError) as err:
        ws.refuse("tdd-submit", [*failures, Failure("artifact-invalid", f"{source} is not readable JSON: {err}",
                                                    "Missing or malformed artifacts never pass a gate")], cur)
    bad = problems(artifact, doc)
    if bad:
        failures.append(Failure("artifact-invalid", f"{source.name} breaks the {artifact} schema: "
                                + "; ".join(bad[:5]), f"See `tierbase flow schema {artifact}`", {"problems": bad}))
    elif not failures:  # references between artifacts: only once the earlier ones are in place
        failures += _meaning(ws, cur, artifact, doc)
    if failures:
        ws.refuse("tdd-submit", failures, cur)
    dest = artifact_path(ws, str(cur.feature), artifact)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(raw)
    sha = hashlib.sha256(raw).hexdigest()
    ws.platform.tdd_command(cur.key, "submit", artifact=artifact, sha256=sha)
    return _done(ws, cur, "tdd-submit", [f"stored {ws.rel(dest)} (sha256 {sha[:12]}); next: "
                                         f"`tierbase tdd approve {artifact}` by another principal"])


def _meaning(ws: Workspace, cur: Current, artifact: str, doc: dict[str, Any]) -> list[Failure]:
    """What a schema cannot say: references between the artifacts."""
    feature = str(cur.feature)
    out = []
    if doc.get("feature") != feature:
        out.append(Failure("artifact-invalid", f"the artifact is for feature {doc.get('feature')!r}, not {feature!r}"))
    if artifact == "architecture":
        nfrs = {n["id"] for n in load_artifact(ws, feature, "spec").get("nfrs", [])}
        missing = sorted(nfrs - {d["nfr"] for d in doc["decisions"]})
        if missing:
            out.append(Failure("nfr-undecided", f"no decision for {', '.join(missing)}",
                               "Decide every non-functional requirement of the spec"))
    if artifact == "test-list":
        spec = load_artifact(ws, feature, "spec")
        acs = {ac["id"] for s in spec["stories"] for ac in s["acceptance_criteria"]}
        mapped = {i["ac"] for i in doc["items"]}
        if acs - mapped:
            out.append(Failure("ac-unmapped", f"acceptance criteria without a test: {', '.join(sorted(acs - mapped))}",
                               "Map every acceptance criterion to at least one named test"))
        if mapped - acs:
            out.append(Failure("unknown-ac", f"no such acceptance criteria in the spec: "
                               f"{', '.join(sorted(mapped - acs))}"))
        ids = [i["id"] for i in doc["items"]]
        if len(set(ids)) != len(ids):
            out.append(Failure("artifact-invalid", "test-list item ids repeat"))
    if artifact == "plan":
        items = [i["id"] for i in load_artifact(ws, feature, "test-list")["items"]]
        planned = [i for c in doc["cycles"] for i in c["items"]]
        if sorted(planned) != sorted(items):
            out.append(Failure("plan-incomplete", "the cycles must hold every test-list item exactly once "
                               f"(test list: {', '.join(items)}; planned: {', '.join(planned)})"))
    return out


def approve(ws: Workspace, artifact: str) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-approve")
    art = t["artifacts"].get(artifact)
    me = str(ws.me["name"])
    if art is None:
        ws.refuse("tdd-approve", [Failure("not-submitted", f"no {artifact} was submitted",
                                          f"`tierbase tdd submit {artifact} FILE` first")], cur)
    failures = gate_problems(ws, cur, t, upto=artifact)
    path = artifact_path(ws, str(cur.feature), artifact)
    if file_sha(path) != art["sha256"]:
        failures.append(Failure("artifact-drift", f"{ws.rel(path)} changed after it was submitted",
                                f"Submit it again: `tierbase tdd submit {artifact} FILE`"))
    if art["submitted"]["by"] == me:
        failures.append(Failure("self-approval", f"{me!r} submitted the {artifact}; someone else approves it",
                                "Another principal runs `tierbase tdd approve`"))
    evidence: dict[str, Any] = {"artifact": artifact, "sha256": art["sha256"]}
    if not failures and artifact == "architecture":
        pending = [d["nfr"] for d in load_artifact(ws, str(cur.feature), artifact)["decisions"]
                   if d["status"] != "approve"]
        if pending:
            failures.append(Failure("changes-requested", f"the architect-reviewer requested changes on "
                                    f"{', '.join(pending)}", "Resolve them and submit a new architecture.json"))
    if not failures and artifact == "test-list":
        items = load_artifact(ws, str(cur.feature), artifact)["items"]
        evidence["items"] = [i["id"] for i in items]
        evidence["fingerprints"] = {i["test"]: testrun.fingerprint(ws.repo, i["test"]) for i in items}
    if failures:
        ws.refuse("tdd-approve", failures, cur)
    ws.platform.tdd_command(cur.key, "approve", artifact=artifact, sha256=art["sha256"],
                            fingerprints=evidence.get("fingerprints", {}), items=evidence.get("items", []))
    return _done(ws, cur, "tdd-approve", [f"approved {artifact} (sha256 {art['sha256'][:12]}) as {me!r}"])


# -- cycles --------------------------------------------------------------------------------
def ordered_items(ws: Workspace, feature: str) -> list[dict[str, Any]]:
    """Test-list items in the plan's order (cycle by cycle)."""
    items = {i["id"]: i for i in load_artifact(ws, feature, "test-list")["items"]}
    return [items[i] for c in load_artifact(ws, feature, "plan")["cycles"] for i in c["items"] if i in items]


def integrity(ws: Workspace, t: dict[str, Any]) -> list[Failure]:
    """Tests of the approved list must still be there, unchanged since their RED (or the list's approval)."""
    out = []
    for test, fp in sorted(t["baselines"].items()):
        if fp is None:
            continue  # not written yet when the list was approved: its RED will baseline it
        now = testrun.fingerprint(ws.repo, test)
        if now is None:
            out.append(Failure("test-deleted", f"{test} was deleted or renamed away",
                               "Restore it; changing the test list needs a re-approved test-list.json",
                               {"test": test}))
        elif now != fp:
            out.append(Failure("test-modified", f"{test} changed since it was recorded (RED or approval)",
                               "Restore it; weakening a test needs a re-approved test-list.json", {"test": test}))
    return out


def red(ws: Workspace, test: str) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-red")
    feature = str(cur.feature)
    failures = gate_problems(ws, cur, t) + [f for f in [_holds(ws, t, "navigator")] if f]
    if failures:
        ws.refuse("tdd-red", failures, cur)
    order = ordered_items(ws, feature)
    item = next((i for i in order if test in (i["id"], i["test"])), None)
    pending = [i["id"] for i in order if i["id"] in t["items"] and t["items"][i["id"]]["green"] is None]
    nxt = next((i for i in order if i["id"] not in t["items"]), None)
    if item is None:
        failures.append(Failure("not-in-test-list", f"{test!r} is not an item of the approved test list",
                                "Only listed tests go RED; a new test needs a re-approved test-list.json"))
    elif pending:
        failures.append(Failure("red-pending", f"{', '.join(pending)} is RED and not GREEN yet",
                                "The driver makes it pass first: `tierbase tdd green`"))
    elif nxt is None or item["id"] != nxt["id"]:
        failures.append(Failure("out-of-order", f"{item['id']} is not next; the plan's next item is "
                                f"{nxt['id'] if nxt else '(none: every item went RED)'}",
                                "Follow the plan's order"))
    fp = testrun.fingerprint(ws.repo, item["test"]) if item else None
    if item is not None and fp is None and not failures:
        failures.append(Failure("test-not-found", f"{item['test']} is not in the working tree",
                                "Write the test first (the navigator writes it; tierbase runs it)"))
    if failures:
        ws.refuse("tdd-red", failures, cur)
    assert item is not None
    run = _ephemeral_run(ws, cur, "tdd-red", [item["test"]])
    reason = item.get("expected_failure")
    if run.failed < 1 or run.errors:
        code, msg = ("test-passes", f"{item['test']} passes: a RED test must fail") if run.exit_code == 0 else \
            ("test-error", f"{item['test']} did not fail cleanly (exit {run.exit_code}): {run.output.strip()[-300:]}")
        ws.refuse("tdd-red", [Failure(code, msg, "Write a test that fails for the stated reason")], cur)
    if reason and reason not in run.output:
        ws.refuse("tdd-red", [Failure("wrong-reason", f"{item['test']} fails, but not for the stated reason "
                                      f"{reason!r}", "Make it fail for the reason the test list names",
                                      {"output": run.output[-1500:]})], cur)
    ws.platform.tdd_command(cur.key, "red", item=item["id"], test=item["test"], fingerprint=fp)
    return _done(ws, cur, "tdd-red", [f"RED: {item['id']} {item['test']} fails on a fresh branch"
                                      + (f" for the stated reason {reason!r}" if reason else "")])


def green(ws: Workspace) -> dict[str, Any]:
    cur, t = _begin(ws, "tdd-green")
    failures = gate_problems(ws, cur, t) + [f for f in [_holds(ws, t, "driver")] if f]
    pending = [i for i, v in t["items"].items() if v["green"] is None]
    if not pending:
        failures.append(Failure("nothing-red", "no test is RED", "The navigator records the next RED first"))
    failures += integrity(ws, t)
    if failures:
        ws.refuse("tdd-green", failures, cur)
    run = _ephemeral_run(ws, cur, "tdd-green", None)
    if run.failed or run.errors or run.passed == 0:
        ws.refuse("tdd-green", [Failure("suite-failing", f"the verify suite is not green: {run.passed} passed, "
                                        f"{run.failed} failed, {run.errors} errors: {', '.join(run.failures[:5])}",
                                        "Make the code pass every test (never change the tests)",
                                        {"failures": run.failures[:50]})], cur)
    ws.platform.tdd_command(cur.key, "green", items=pending, sha=ws.git.head(), passed=run.passed)
    return _done(ws, cur, "tdd-green", [f"GREEN: {', '.join(pending)} ({run.passed} tests pass on a fresh branch)"])


def _ephemeral_run(ws: Workspace, cur: Current, gate: str, select: list[str] | None) -> testrun.RunResult:
    """Run tests on a fresh branch of the feature's database branch, deleted afterwards."""
    db, branch = cur.claim["db_branch"], f"{gate.removeprefix('tdd-')}-{cur.feature}"
    with contextlib.suppress(TierbaseError):  # a crashed run's leftover
        ws.platform.delete_branch(branch, recursive=True)
    try:
        ws.platform.create_branch(branch, db, ttl=EPHEMERAL_TTL)
    except PolicyDenied as err:
        ws.refuse(gate, [ws.policy_failure(err)], cur)
    try:
        if ws.migration_files():
            ws.platform.migrate_apply(branch, str(ws.migrations_dir))
        return testrun.run(ws.test_command, ws.repo, ws.platform.branch_url(branch, ws.database), select)
    finally:
        ws.platform.delete_branch(branch, recursive=True)


# -- reading -------------------------------------------------------------------------------
def pr_ready_failures(ws: Workspace, cur: Current) -> list[Failure]:
    """With TDD on: approved, undrifted artifacts; every test-list item GREEN; the listed tests intact."""
    t = _tdd(cur)
    if t is None:
        return []
    out = [Failure("tdd-" + f.code, f"TDD: {f.message}", f.hint) for f in gate_problems(ws, cur, t)]
    if not out:
        missing = [i["id"] for i in ordered_items(ws, str(cur.feature))
                   if (t["items"].get(i["id"]) or {}).get("green") is None]
        if missing:
            out.append(Failure("tdd-incomplete", f"TDD: test-list items not GREEN yet: {', '.join(missing)}",
                               "Every item goes RED (navigator) then GREEN (driver) before pr-ready"))
    out += [Failure("tdd-" + f.code, f"TDD: {f.message}", f.hint, f.data) for f in integrity(ws, t)]
    return out


def status(ws: Workspace) -> dict[str, Any]:
    """Read-only: the control plane's view (a drifted state file is `flow doctor`'s business, not a refusal)."""
    expected = ws.expected()
    if expected is None or expected["state"] not in IN_FLIGHT or expected["feature"] is None:
        raise InvalidInput("no feature is in flight, so there is no TDD status",
                           "Claim one first: `tierbase flow claim FEATURE`")
    cur = Current(expected)
    t = _tdd(cur) or {}
    feature = str(cur.feature)
    if not t:
        return {"feature": feature, "enabled": False, "roles": {}, "artifacts": {}, "items": [], "drift": [],
                "next": "enable TDD: `tierbase tdd enable`"}
    artifacts = {}
    for name in ORDER:
        art = t["artifacts"].get(name)
        now = file_sha(artifact_path(ws, feature, name))
        artifacts[name] = {"submitted": art is not None, "sha256": art["sha256"] if art else None,
                           "current_sha256": now,
                           "approved_by": (art.get("approved") or {}).get("by") if art else None,
                           "approved_sha256": (art.get("approved") or {}).get("sha256") if art else None,
                           "drift": bool(art and art.get("approved") and now != art["approved"]["sha256"])}
    items = []
    plan_ok = all(artifacts[n]["approved_by"] and not artifacts[n]["drift"] for n in ORDER)
    for i in ordered_items(ws, feature) if plan_ok else []:
        rec = t["items"].get(i["id"]) or {}
        items.append({"id": i["id"], "ac": i["ac"], "test": i["test"],
                      "status": "green" if rec.get("green") else ("red" if rec.get("red") else "pending")})
    drift = [f.to_dict() for f in gate_problems(ws, cur, t) if f.code == "artifact-drift"]
    drift += [f.to_dict() for f in integrity(ws, t)]
    return {"feature": feature, "enabled": True, "roles": t["roles"], "artifacts": artifacts, "items": items,
            "drift": drift, "next": _next_step(t, artifacts, items)}


def _next_step(t: dict[str, Any], artifacts: dict[str, Any], items: list[dict[str, Any]]) -> str:
    missing = [r for r in ROLES if r not in t["roles"]]
    if missing:
        return f"assign roles: {', '.join(missing)}"
    for name in ORDER:
        if not artifacts[name]["submitted"]:
            return f"the {ARTIFACTS[name]} submits {name}.json"
        if not artifacts[name]["approved_by"] or artifacts[name]["drift"]:
            return f"approve {name}.json (someone other than its author)"
    red_now = [i for i in items if i["status"] == "red"]
    if red_now:
        return f"the driver makes {red_now[0]['id']} pass: `tierbase tdd green`"
    pending = [i for i in items if i["status"] == "pending"]
    if pending:
        return f"the navigator writes {pending[0]['test']}: `tierbase tdd red {pending[0]['id']}`"
    return "every item is GREEN: `tierbase flow ready`"
