"""The workflow's transitions as commands the control plane executes (issue 10).

A client never writes an event: it asks for ``claim``, ``ready``, ``ci``,
``merge``, ``abandon`` or a TDD verb, and the service decides. For each
command, in this order:

1. who acts comes from the token alone (the facade's actor);
2. authorization: may this principal do this to this feature at all? A refusal
   here says nothing about the feature's state (exit 2, audited, no history);
3. every precondition, evaluated on evidence the service holds or produces:
   its own git repository (:mod:`.gitstore`), the tier's recorded commit, its
   own static reading of the tests (:mod:`.inventory`), migrations it verifies
   itself, CI results a ``ci`` principal reported from the runner;
4. the effect, then the event in the feature's history (and the audit trail).

Facts a client reports about its working copy (its checked-out branch,
uncommitted paths) are used only to refuse, never to grant.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from ..errors import BranchNotFound, InvalidInput, PolicyDenied, TierbaseError
from ..git import feature_git_branch
from ..governance.policy import Action, Subject
from ..names import check_name
from ..provider import branch_lock
from . import inventory, testrun
from .errors import Failure, GateFailed
from .gitstore import GitStore
from .history import FlowHistory
from .names import check_feature
from .state import IN_FLIGHT, FlowState, Transition, effective, iso, next_state, project

if TYPE_CHECKING:
    from ..control.store import Store
    from ..governance.config import Config
    from ..governance.gate import Gate
    from ..home import Home
    from ..migrate.files import Migration


class Platform(Protocol):
    """What the commands use of the platform: the facade (``Tierbase``), or the workflow service's view
    of the services it is given (app_flow.py). Every call acts as ``actor``."""

    @property
    def actor(self) -> str | None: ...
    @property
    def home(self) -> Home: ...
    @property
    def store(self) -> Store: ...
    @property
    def gate(self) -> Gate: ...
    @property
    def config(self) -> Config: ...

    def create_branch(self, name: str, parent: str | None = None) -> dict[str, Any]: ...
    def create_ci_branch(self, feature: str, parent: str | None = None, *, ttl: str | None = None) -> dict[str, Any]:
        ...
    def delete_branch(self, name: str, recursive: bool = False) -> list[str]: ...
    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]: ...
    def migrate_apply(self, branch: str, migrations_dir: str | None = None) -> dict[str, Any]: ...
    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]: ...
    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]: ...
    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> dict[str, Any]: ...
    def masking_change(self, migrations: list[Migration], masking: dict[str, Any] | None = None) -> dict[str, Any]:
        ...
    def rolled_back_migrations(self, tier: str) -> dict[str, int]: ...

CI_TTL = "2h"
CONFIG_FILE = "tierbase.toml"
DEFAULT_TEST_COMMAND = "pytest -q"
DEFAULT_MIGRATIONS = "db/migrations"
ROLES = ("spec-author", "architect-reviewer", "test-strategist", "scrum-master", "navigator", "driver")
ARTIFACTS = {"spec": "spec-author", "architecture": "architect-reviewer", "test-list": "test-strategist",
             "plan": "scrum-master"}
#: pairs of roles one principal may not hold together on a feature
CONFLICTS = (("navigator", "driver"), ("test-strategist", "driver"))


def _b64(data: str | None) -> bytes:
    try:
        return base64.b64decode(data or "", validate=True)
    except ValueError as err:
        raise InvalidInput("the git bundle is not base64", "Send it as the client library does") from err


class Flow:
    """The commands, acting as ``tb``'s principal."""

    def __init__(self, tb: Platform) -> None:
        self.tb = tb
        self.history = FlowHistory(tb.store)
        self.repo = GitStore(tb.home.root / "flow" / "repo.git")

    # -- who -------------------------------------------------------------------------------
    @property
    def me(self) -> str:
        return self.tb.gate.principal(self.tb.actor).name

    def base_role(self, name: str | None = None) -> str:
        p = self.tb.gate.principal(name or self.tb.actor)
        return self.tb.config.base_role(p.role)

    def deny(self, gate: str, target: str, code: str, message: str, hint: str) -> NoReturn:
        """Authorization failed: audited, no history written, nothing said about the target's state."""
        self.tb.gate.audit.append(actor=self.me, action=f"flow.{gate}", target=target, allowed=False,
                                  reason=f"{code}: {message}", outcome="refused")
        raise GateFailed(gate, [Failure(code, message, hint)])

    def refuse(self, key: str, gate: str, failures: list[Failure]) -> NoReturn:
        """A precondition failed: recorded in the history it is about (state unchanged), audited, raised."""
        state = self.state(key)
        if state is not None:
            self.history.record(key, f"{gate}-refused", state, self.me, {"failures": [f.to_dict() for f in failures]})
        codes = ", ".join(f.code for f in failures)
        self.tb.gate.audit.append(actor=self.me, action=f"flow.{gate}-refused", target=key, allowed=False,
                                  reason=f"gate failed: {codes}", outcome="refused", after={"state": state})
        raise GateFailed(gate, failures, state)

    def record(self, key: str, transition: str, state: str, evidence: dict[str, Any]) -> None:
        self.history.record(key, transition, state, self.me, evidence)
        self.tb.gate.audit.append(actor=self.me, action=f"flow.{transition}", target=key, allowed=True,
                                  reason="workflow command whose gates the platform checked", after={"state": state})

    # -- what the history says -------------------------------------------------------------------
    def events(self, key: str) -> list[dict[str, Any]]:
        return effective(self.history.events(key))

    def state(self, key: str) -> str | None:
        evs = self.events(key)
        return str(evs[-1]["state"]) if evs else None

    def doc(self, feature: str) -> dict[str, Any]:
        return project(workspace="", project_name="", key=feature, events=self.history.events(feature))

    def claim_of(self, feature: str) -> dict[str, Any]:
        return dict(self.doc(feature)["transitions"].get("claim") or {})

    def in_flight(self, gate: str, feature: str) -> dict[str, Any]:
        """A feature's projection (claimed at least once); an unknown feature is refused without detail.

        Each command checks the state itself, after its own authorization.
        """
        check_name(feature, "feature")
        doc = self.doc(feature)
        if doc["state"] is None or "claim" not in doc["transitions"]:
            self.deny(gate, feature, "no-such-feature", f"no feature {feature!r} is in flight",
                      "Claim it first: `tierbase flow claim FEATURE`")
        return doc

    def owner_only(self, gate: str, feature: str, doc: dict[str, Any], *, engineer: bool = True) -> None:
        owner = doc["transitions"]["claim"].get("owner")
        if owner == self.me or (engineer and self.base_role() == "platform-engineer"):
            return
        self.deny(gate, feature, "not-feature-owner", f"{self.me!r} does not own feature {feature!r} "
                  f"(claimed by {owner!r})", "Only the principal that claimed a feature moves it")

    # -- the tier's recorded commit and what it declares --------------------------------------------
    def tiers(self) -> dict[str, dict[str, Any]]:
        rows = self.tb.store.db.execute("SELECT tier, git_branch, sha, at, by FROM flow_tiers")
        return {r["tier"]: dict(r) for r in rows}

    def git_branch(self, tier: str) -> str:
        t = self.tb.config.tiers.get(tier)
        return (t.git_branch if t is not None else None) or tier

    def project_config(self, sha: str) -> dict[str, Any]:
        """``[project]`` of the tierbase.toml committed at ``sha`` (the tier's own, never a feature's edit)."""
        text = self.repo.show(sha, CONFIG_FILE) or ""
        try:
            return dict(tomllib.loads(text).get("project", {}))
        except tomllib.TOMLDecodeError:
            return {}

    @contextlib.contextmanager
    def migrations_at(self, sha: str, tier_sha: str) -> Any:
        """The migration files of ``sha`` in a directory the service made (where the tier's config says)."""
        rel = str(self.project_config(tier_sha).get("migrations", DEFAULT_MIGRATIONS))
        with self.repo.checkout(sha) as tree:
            d = (tree / rel).resolve()
            if not d.is_relative_to(tree.resolve()):
                raise InvalidInput(f"the migrations dir {rel!r} is outside the repository", "Fix [project] migrations")
            yield d, sorted(p.name for p in d.glob("*.sql") if p.is_file()) if d.is_dir() else []

    # == register =====================================================================================
    def register(self, workspace: str, bundle: str | None) -> dict[str, Any]:
        """A workspace joins the platform; the first one brings the tiers' commits (a bundle of them)."""
        check_name(workspace, "workspace")
        if not workspace.startswith("ws-"):
            raise InvalidInput(f"{workspace!r} is not a workspace id", "Let `tierbase init` make one")
        known = self.tiers()
        new_repo = not known
        if new_repo and self.base_role() not in ("platform-engineer", "developer"):
            self.deny("scaffold", workspace, "register-refused", f"{self.me!r} ({self.base_role()}) may not register "
                      "the project's repository", "A developer or platform engineer runs the first `tierbase init`")
        row = self.tb.store.db.execute("SELECT owner FROM flow_workspaces WHERE workspace=?", (workspace,)).fetchone()
        if row is not None and row["owner"] != self.me and self.base_role() != "platform-engineer":
            self.deny("scaffold", workspace, "not-workspace-owner",
                      f"workspace {workspace} belongs to {row['owner']!r}",
                      "Use your own clone (its own `tierbase init`)")
        cfg = self.tb.config
        failures = []
        for tier in cfg.tier_order():
            b = self.tb.store.find(tier)
            if b is None or b.kind.value != "tier":
                failures.append(Failure("tier-missing", f"tier {tier!r} does not exist on the platform",
                                        f"Load the config: `tierbase policy reload --file {CONFIG_FILE}`"))
        if failures:
            raise GateFailed("scaffold", failures)
        said = []
        if new_repo:
            if not self.repo.exists():
                self.repo.create()
            got = self.repo.receive(_b64(bundle), workspace)
            missing = [self.git_branch(t) for t in cfg.tier_order() if self.git_branch(t) not in got]
            if missing:
                raise GateFailed("scaffold", [Failure("git-branch-missing", f"the bundle lacks the tier git "
                                                      f"branch(es) {', '.join(missing)}",
                                                      "Run `tierbase init` in a repo with a commit")])
            with self.tb.store.write() as db:
                for tier in cfg.tier_order():
                    gb = self.git_branch(tier)
                    self.repo.set_ref(f"refs/heads/{gb}", got[gb])
                    db.execute("INSERT INTO flow_tiers(tier, git_branch, sha, at, by) VALUES(?,?,?,?,?)",
                               (tier, gb, got[gb], time.time(), self.me))
            said.append("registered the project's repository with the platform (tier commits recorded: "
                        + ", ".join(f"{self.git_branch(t)} {got[self.git_branch(t)][:10]}" for t in cfg.tier_order())
                        + ")")
        if row is None:
            with self.tb.store.write() as db:
                db.execute("INSERT INTO flow_workspaces(workspace, owner, at) VALUES(?,?,?)",
                           (workspace, self.me, time.time()))
        if not self.events(workspace):
            tiers = {t: self.git_branch(t) for t in cfg.tier_order()}
            self.record(workspace, Transition.SCAFFOLD, FlowState.SCAFFOLD_COMPLETE,
                        {"project": str(cfg.project.get("name") or "app"), "entry_tier": cfg.entry, "tiers": tiers,
                         "config_sha256": cfg.digest, "owner": self.me})
            said.append(f"recorded the scaffold of workspace {workspace} in the control plane")
        else:
            said.append(f"workspace {workspace} was scaffolded before; nothing to record")
        return {"workspace": workspace, "said": said, **self.tier_refs()}

    def tier_refs(self) -> dict[str, Any]:
        """The tiers' accepted commits and a bundle holding them (clients reset their tier branches to it)."""
        tiers = self.tiers()
        refs = {t["git_branch"]: t["sha"] for t in tiers.values()}
        return {"tiers": {k: {"git_branch": v["git_branch"], "sha": v["sha"]} for k, v in tiers.items()},
                "bundle": base64.b64encode(self.repo.bundle(refs)).decode() if refs else None}

    def workspace_owner(self, workspace: str) -> str | None:
        row = self.tb.store.db.execute("SELECT owner FROM flow_workspaces WHERE workspace=?", (workspace,)).fetchone()
        return str(row["owner"]) if row else None

    # == claim ========================================================================================
    def claim(self, workspace: str, feature: str, parent: str | None, local: dict[str, Any]) -> dict[str, Any]:
        check_name(workspace, "workspace")
        owner = self.workspace_owner(workspace)
        if owner is None:
            self.deny("claim", workspace, "not-scaffolded", f"workspace {workspace} is not registered",
                      "Run `tierbase init` in the app repo")
        shared = self.base_role(owner) == "platform-engineer"  # a clone a platform engineer set up for others
        if owner != self.me and not shared and self.base_role() != "platform-engineer":
            self.deny("claim", workspace, "not-workspace-owner", f"workspace {workspace} belongs to {owner!r}",
                      "Claim in your own clone")
        cfg = self.tb.config
        tier = parent or cfg.entry
        if self.tb.store.find(tier) is not None:  # authorization before validation: may it branch off there?
            subject = self.tb.gate.subject(self.tb.store.get(tier))
            decision = self.tb.gate.decide(self.tb.actor, Action.BRANCH_CREATE, subject)
            if not decision.allowed:
                self.refuse(workspace, "claim", [Failure("policy-denied", f"branch.create on {tier!r} is refused: "
                                                         f"{decision.reason}", "Claim from the entry tier",
                                                         {"rule": decision.rule})])
        bad = check_feature(feature)
        if bad is not None:
            self.refuse(workspace, "claim", [bad])
        ws_state = self.state(workspace)
        pointer = _pointer(self.history.events(workspace))
        if ws_state in IN_FLIGHT and pointer is not None:
            if pointer == feature:
                return {"resumed": True, "feature": feature, "said": [f"feature {feature!r} is already claimed "
                                                                      f"({self.state(feature)}): resumed"]}
            self.refuse(workspace, "claim", [Failure("feature-in-flight", f"feature {pointer!r} is in flight "
                                                     f"({self.state(pointer)})",
                                                     f"Finish it (`tierbase flow status`) or abandon it (`tierbase "
                                                     f"flow abandon`) before claiming {feature!r}")])
        failures = []
        tiers = self.tiers()
        if tier not in cfg.tiers:
            failures.append(Failure("unknown-tier", f"{tier!r} is not a tier of tierbase.toml",
                                    f"Use one of: {', '.join(cfg.tier_order())}"))
        elif tier not in tiers:
            failures.append(Failure("git-branch-missing", f"the platform has no recorded commit for tier {tier!r}",
                                    "Run `tierbase init` again to register the tier git branches"))
        if local.get("dirty"):
            dirty = [str(p) for p in local["dirty"]]
            failures.append(Failure("dirty-worktree", f"uncommitted code: {', '.join(dirty[:8])}",
                                    "Commit (or stash) your changes before switching to the feature branch"))
        if self.tb.store.find(feature) is not None:
            failures.append(Failure("db-branch-exists", f"a database branch named {feature!r} already exists",
                                    "Pick another feature name, or delete that branch first"))
        past = self.state(feature)
        if past == FlowState.MERGED:
            failures.append(Failure("feature-merged", f"feature {feature!r} was merged already",
                                    "Claim the follow-up work under a new feature name"))
        elif past in IN_FLIGHT:
            failures.append(Failure("feature-in-flight", f"feature {feature!r} is in flight in another workspace",
                                    "Pick another feature name"))
        if failures:
            self.refuse(workspace, "claim", failures)
        made = self.tb.create_branch(feature, tier)
        t = tiers[tier]
        evidence = {"feature": feature, "git_branch": feature_git_branch(feature), "db_branch": feature, "parent": tier,
                    "tier_git_branch": t["git_branch"], "base_sha": t["sha"], "workspace": workspace,
                    "owner": self.me, "owner_role": self.base_role(), "claimed_at": iso(time.time())}
        self.record(feature, Transition.CLAIM, FlowState.FEATURE_CLAIMED, evidence)
        self.record(workspace, Transition.CLAIM, FlowState.FEATURE_CLAIMED, {"feature": feature})
        return {"resumed": False, "feature": feature, "evidence": evidence, "said": [
            f"created database branch {feature!r} from tier {tier!r} in {made.get('elapsed_ms', '?')} ms"]}

    def rolled_back_failures(self, tier: str, files: list[str]) -> list[Failure]:
        """A commit that still holds migrations a rollback of the tier took away would promote them again."""
        gone = self.tb.rolled_back_migrations(tier)
        back = [f for f in files if f.removesuffix(".sql") in gone]
        if not back:
            return []
        ids = sorted({gone[f.removesuffix(".sql")] for f in back})
        return [Failure("migration-rolled-back", f"{', '.join(back)} {'was' if len(back) == 1 else 'were'} rolled "
                        f"back on {tier!r} (rollback #{', #'.join(map(str, ids))}) and this commit still has "
                        f"{'it' if len(back) == 1 else 'them'}",
                        "Commit the revert `tierbase rollback` proposed (remove the files; write a new migration "
                        "for the fixed change), then run `tierbase flow ready` again", {"files": back})]

    # == ready ========================================================================================
    def ready(self, feature: str, bundle: str | None, local: dict[str, Any]) -> dict[str, Any]:
        doc = self.in_flight("ready", feature)
        self.owner_only("ready", feature, doc, engineer=False)
        c = doc["transitions"]["claim"]
        if next_state(Transition.READY, FlowState(doc["state"])) is None:
            self.refuse(feature, "ready", [Failure("wrong-state", f"`flow ready` needs state feature-claimed, "
                                                   f"pr-ready or ci-green, and the state is {doc['state']}")])
        failures = local_failures(c, local)
        tier = self.tiers()[c["parent"]]
        head = self.receive_feature(feature, c, bundle)
        ahead = self.repo.commits_between(tier["sha"], head) if head else []
        if not ahead:
            failures.append(Failure("no-commits-ahead", f"{c['git_branch']} has no commit that the tier's recorded "
                                    f"commit ({tier['git_branch']} {tier['sha'][:10]}) lacks",
                                    "Commit your change first"))
        if head is None:
            self.refuse(feature, "ready", failures)
        tests, test_failures = self.compare_tests(tier, head)
        approved = self.approved_codes(feature, head)
        failures += [f for f in test_failures if f.code not in approved]
        verify: dict[str, Any] = {}
        with self.migrations_at(head, tier["sha"]) as (mdir, files):
            verify = {"files": files}
            failures += self.rolled_back_failures(c["parent"], files)
            if files:
                try:
                    verify = {"files": files, **self.tb.migrate_verify(c["parent"], str(mdir))}
                except TierbaseError as err:
                    verify = {"files": files, "ok": False, "problems": [err.message]}
                if not verify.get("ok"):
                    probs = [str(p) for p in verify.get("problems", [])] or ["verification failed"]
                    failures.append(Failure("migration-invalid", "the pending migrations do not verify on a "
                                            f"throwaway branch of {c['parent']!r}: " + "; ".join(probs[:5]),
                                            "Fix the migration files, commit, and run `tierbase flow ready` again",
                                            {"problems": probs, "lint": verify.get("lint")}))
            if files:
                failures += self.masking_failures(head, tier["sha"], mdir, verify)
            failures += self.tdd_ready_failures(feature, doc, head)
            if failures:
                self.refuse(feature, "ready", failures)
            applied: list[Any] = []
            diff_text = "No migrations in this change."
            if files:
                try:
                    applied = list(self.tb.migrate_apply(c["db_branch"], str(mdir)).get("applied", []))
                    diff_text = str(self.tb.diff(c["parent"], c["db_branch"], "markdown").get("text", "")) \
                        or "No schema change."
                except TierbaseError as err:
                    self.refuse(feature, "ready", [Failure("feature-branch-migrations", "the migrations do not apply "
                                                           f"to the feature branch {c['db_branch']!r}: {err.message}",
                                                           f"Reset it (`tierbase branch reset {c['db_branch']}`) and "
                                                           "run `tierbase flow ready` again")])
        self.repo.set_ref(f"refs/tierbase/features/{feature}", head)
        evidence = {"head_sha": head, "tier_sha": tier["sha"], "commits_ahead": ahead, "tests": tests,
                    "tests_approved": sorted(approved),
                    "migrations": {"files": files, "verify": verify, "applied_to_feature": applied},
                    "review": f".tierbase/reviews/{feature}.md", "change_request": f".tierbase/changes/{feature}.json",
                    "pull_request": None, "pull_request_note": "the platform records no pull request: the change "
                    "request is local only", "diff": diff_text[:20000]}
        self.record(feature, Transition.READY, FlowState.PR_READY, evidence)
        return {"said": [f"{len(ahead)} commit(s) ahead of {tier['git_branch']}'s recorded commit",
                         f"tests: {tests['head']['total']} on {head[:10]}, {tests['tier']['total']} on the tier"]
                + ([f"verified {len(files)} migration file(s) on a throwaway branch; applied {len(applied)} to "
                    f"{c['db_branch']!r}"] if files else [])}

    def masking_failures(self, head: str, tier_sha: str, mdir: Path, verify: dict[str, Any]) -> list[Failure]:
        """A column the change adds to a sensitive table must be classified in the same change (its own
        tierbase.toml [masking]); what it derives from masked columns is recorded as evidence."""
        from ..migrate.files import discover

        with self.migrations_at(tier_sha, tier_sha) as (_, old):
            new = [m for m in discover(mdir) if m.path.name not in set(old)] if mdir.is_dir() else []
        try:
            masking = tomllib.loads(self.repo.show(head, CONFIG_FILE) or "").get("masking")
        except tomllib.TOMLDecodeError:
            masking = None
        change = self.tb.masking_change(new, masking if isinstance(masking, dict) else None)
        verify["masking"] = change
        out = []
        for u in change["unclassified"]:
            schema, table, column = u["column"].split(".", 2)
            key = f"{table}.{column}" if schema == "public" else u["column"]
            out.append(Failure("unclassified-column", f"{u['where']}: {u['column']} is added to the sensitive table "
                               f"{schema}.{table} and nothing classifies it",
                               f"Classify it in the same change: `{key} = \"<method>\"` or `{key} = \"safe\"` in "
                               "the [masking] table of tierbase.toml", {"column": u["column"], "where": u["where"]}))
        return out

    def receive_feature(self, feature: str, c: dict[str, Any], bundle: str | None) -> str | None:
        if not bundle:
            return None
        got = self.repo.receive(_b64(bundle), f"{feature}")
        head = got.get(c["git_branch"])
        if head is None:
            raise InvalidInput(f"the bundle does not hold {c['git_branch']}", "Send the feature branch")
        return head

    def compare_tests(self, tier: dict[str, Any], head: str) -> tuple[dict[str, Any], list[Failure]]:
        command = str(self.project_config(tier["sha"]).get("test_command", DEFAULT_TEST_COMMAND))
        head_command = str(self.project_config(head).get("test_command", DEFAULT_TEST_COMMAND))
        base = inventory.read(self.repo, tier["sha"], command)
        now = inventory.read(self.repo, head, head_command)
        return inventory.compare(base, now, tier["git_branch"])

    def approved_codes(self, feature: str, sha: str) -> set[str]:
        return {code for e in self.events(feature) if e["transition"] == "tests-approved"
                and e["evidence"].get("sha") == sha for code in e["evidence"].get("codes", [])}

    # == approve-tests: a human reviewer accepts changed tests of one commit ============================
    def approve_tests(self, feature: str, sha: str) -> dict[str, Any]:
        doc = self.in_flight("approve-tests", feature)
        owner = doc["transitions"]["claim"].get("owner")
        if self.base_role() not in ("developer", "platform-engineer"):
            self.deny("approve-tests", feature, "reviewer-not-human", f"{self.me!r} ({self.base_role()}) cannot "
                      "approve test changes", "A developer or platform engineer reviews them")
        if owner == self.me:
            self.deny("approve-tests", feature, "self-approval", f"{self.me!r} claimed {feature!r}: someone else "
                      "reviews its tests", "Another developer runs `tierbase flow approve-tests`")
        if not self.repo.has_commit(sha):
            self.refuse(feature, "approve-tests", [Failure("unknown-commit", f"the platform has no commit {sha[:12]}",
                                                           "Run `tierbase flow ready` first so it is sent")])
        tier = self.tiers()[doc["transitions"]["claim"]["parent"]]
        tests, failures = self.compare_tests(tier, sha)
        codes = sorted({f.code for f in failures if f.code in inventory.WAIVABLE})
        self.history.record(feature, "tests-approved", str(doc["state"]), self.me,
                            {"sha": sha, "codes": codes, "tests": tests})
        self.tb.gate.audit.append(actor=self.me, action="flow.tests-approved", target=feature, allowed=True,
                                  reason=f"human review of {sha[:12]}: {', '.join(codes) or 'nothing to waive'}")
        return {"feature": feature, "sha": sha, "approved": codes, "said": [
            f"approved {', '.join(codes) or 'nothing (no changed tests)'} for {sha[:12]} as {self.me!r}"]}

    # == ci: asked for by the author, run by a runner, recorded from the runner's report ===================
    def ci_request(self, feature: str, local: dict[str, Any]) -> dict[str, Any]:
        doc = self.in_flight("ci", feature)
        owner = doc["transitions"]["claim"].get("owner")
        if owner != self.me and self.base_role() == "agent":
            self.deny("ci", feature, "not-feature-owner", f"{self.me!r} does not own feature {feature!r}",
                      "Only its owner or a developer asks for its CI run")
        if next_state(Transition.CI, FlowState(doc["state"])) is None:
            self.refuse(feature, "ci", [Failure("wrong-state", f"`flow ci` needs state pr-ready or ci-green, and "
                                                f"the state is {doc['state']}", "Prepare it first: `flow ready`")])
        sha = str(doc["transitions"]["ready"]["head_sha"])
        failures = local_failures(doc["transitions"]["claim"], local)
        if local.get("head") and local["head"] != sha:
            failures.append(Failure("head-changed-since-ready", f"HEAD is {str(local['head'])[:10]}, but the change "
                                    f"was prepared at {sha[:10]}", "Prepare it again: `tierbase flow ready`"))
        if failures:
            self.refuse(feature, "ci", failures)
        with self.tb.store.write() as db:
            row = db.execute("SELECT id FROM ci_jobs WHERE feature=? AND sha=? AND state!='done'",
                             (feature, sha)).fetchone()
            if row is None:
                job = db.execute("INSERT INTO ci_jobs(feature, sha, state, requested_by, requested_at) "
                                 "VALUES(?,?,?,?,?)", (feature, sha, "queued", self.me, time.time())).lastrowid
            else:
                job = row["id"]
        self.tb.gate.audit.append(actor=self.me, action="flow.ci-requested", target=feature, allowed=True,
                                  reason=f"CI run #{job} of {sha[:12]} queued for a runner")
        return self.ci_job(int(job or 0))

    def ci_job(self, job: int) -> dict[str, Any]:
        row = self.tb.store.db.execute("SELECT * FROM ci_jobs WHERE id=?", (job,)).fetchone()
        if row is None:
            raise InvalidInput(f"no CI run #{job}", "See `tierbase flow status`")
        out = dict(row)
        out["result"] = json.loads(row["result"]) if row["result"] else None
        return out

    def ci_jobs(self, feature: str) -> list[dict[str, Any]]:
        rows = self.tb.store.db.execute("SELECT id FROM ci_jobs WHERE feature=? ORDER BY id", (feature,))
        return [self.ci_job(int(r["id"])) for r in rows.fetchall()]

    def runner_only(self, gate: str, target: str) -> None:
        if self.base_role() != "ci":
            self.deny(gate, target, "not-a-runner", f"{self.me!r} ({self.base_role()}) is not a CI runner",
                      "CI results are recorded only from a runner holding a `ci` token (`tierbase ci runner`)")

    def ci_next(self) -> dict[str, Any] | None:
        """A runner takes the oldest queued run: the platform makes its branch and applies its migrations."""
        self.runner_only("ci-take", "ci")
        with self.tb.store.write() as db:
            row = db.execute("SELECT id FROM ci_jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE ci_jobs SET state='running', runner=?, started_at=? WHERE id=?",
                       (self.me, time.time(), row["id"]))
        job = self.ci_job(int(row["id"]))
        feature, sha = str(job["feature"]), str(job["sha"])
        doc = self.doc(feature)
        ready = doc["transitions"].get("ready") or {}
        if doc["state"] not in (FlowState.PR_READY, FlowState.CI_GREEN) or ready.get("head_sha") != sha:
            self._finish(job, {"green": False, "failures": [Failure(
                "stale-ci-run", f"{feature!r} moved on since {sha[:10]} was queued", "Ask for a new run").to_dict()]})
            return self.ci_next()
        c = doc["transitions"]["claim"]
        tier_sha = str(ready["tier_sha"])
        pc = self.project_config(tier_sha)
        branch = f"ci-{feature}"
        with contextlib.suppress(BranchNotFound):
            self.tb.delete_branch(branch, recursive=True)
        self.tb.create_ci_branch(feature, c["parent"], ttl=CI_TTL)
        try:
            with self.migrations_at(sha, tier_sha) as (mdir, files):
                applied = self.tb.migrate_apply(branch, str(mdir)).get("applied", []) if files else []
        except TierbaseError as err:
            with contextlib.suppress(TierbaseError):
                self.tb.delete_branch(branch, recursive=True)
            self._finish(job, {"green": False, "failures": [Failure(
                "ci-migrations-failed", f"the migrations do not apply to a fresh branch of {c['parent']!r}: "
                f"{err.message}", "Fix the migrations, then ready and ci again").to_dict()]})
            return self.ci_next()
        return {**job, "tier": c["parent"], "tier_sha": tier_sha, "ci_branch": branch, "applied": len(applied),
                "command": str(pc.get("test_command", DEFAULT_TEST_COMMAND)),
                "database": str(pc.get("database", self.tb.config.project.get("database", "postgres"))),
                "bundle": base64.b64encode(self.repo.bundle({f"ci/{feature}": sha})).decode()}

    def ci_report(self, job_id: int, junit: str | None, output: str, exit_code: int,
                  duration_s: float) -> dict[str, Any]:
        """The runner's report: the platform parses the JUnit itself and records ci-green for that SHA only."""
        self.runner_only("ci-report", f"ci-{job_id}")
        job = self.ci_job(job_id)
        if job["state"] != "running" or job["runner"] != self.me:
            self.deny("ci-report", f"ci-{job_id}", "not-your-run", f"CI run #{job_id} is not running on "
                      f"{self.me!r}", "A runner reports only the runs it took")
        run = testrun.RunResult(source="none")
        if junit:
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
                f.write(junit)
                f.flush()
                try:
                    run = testrun.parse_junit(Path(f.name))
                except Exception:  # a runner's garbage is never green
                    run = testrun.RunResult(source="junit-unreadable")
        if (exit_code not in (0, 1, 5) or run.source != "junit") and run.failed + run.errors == 0:
            run.errors += 1  # interrupted, crashed or no JUnit: never green
            run.failures.append(f"(the test command exited {exit_code}; JUnit: {run.source})")
        run.exit_code, run.duration_s, run.output = exit_code, round(float(duration_s), 2), output[-20000:]
        feature = str(job["feature"])
        ready = self.doc(feature)["transitions"].get("ready") or {}
        baseline = dict((ready.get("tests") or {}).get("tier") or {"total": 0, "inactive": 0})
        failures = ci_failures(run, baseline)
        with contextlib.suppress(TierbaseError):
            self.tb.delete_branch(f"ci-{feature}", recursive=True)
        evidence = {"sha": job["sha"], **{k: v for k, v in run.to_dict().items() if k != "failures"},
                    "ci_branch": f"ci-{feature}", "baseline": baseline, "command": job_command(self, ready),
                    "runner": self.me, "run": job_id, "log": output[-4000:]}
        result = {"green": not failures, "failures": [f.to_dict() for f in failures], "evidence": evidence}
        self._finish(job, result, output)
        return self.ci_job(job_id)

    def _finish(self, job: dict[str, Any], result: dict[str, Any], log: str = "") -> None:
        feature = str(job["feature"])
        doc = self.doc(feature)
        ready = doc["transitions"].get("ready") or {}
        with self.tb.store.write() as db:
            db.execute("UPDATE ci_jobs SET state='done', finished_at=?, result=?, log=? WHERE id=?",
                       (time.time(), json.dumps(result, sort_keys=True), log[-200000:], job["id"]))
        current = doc["state"] in (FlowState.PR_READY, FlowState.CI_GREEN) and ready.get("head_sha") == job["sha"]
        if not current:
            return  # a new commit was prepared since: this result is for nobody
        if result["green"]:
            self.record(feature, Transition.CI, FlowState.CI_GREEN, result["evidence"])
        else:
            self.history.record(feature, "ci-refused", str(doc["state"]), self.me,
                                {"failures": result["failures"], "run": result.get("evidence", {})})
            codes = ", ".join(str(f["code"]) for f in result["failures"])
            self.tb.gate.audit.append(actor=self.me, action="flow.ci-refused", target=feature, allowed=False,
                                      reason=f"gate failed: {codes}", outcome="refused")

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock shared by every service process (commands on one feature, merges into one tier)."""
        return branch_lock(self.tb.home.root / "flow" / "locks", name)

    # == merge: one operation ========================================================================
    def merge(self, feature: str, local: dict[str, Any]) -> dict[str, Any]:
        tier = self.in_flight("merge", feature)["transitions"]["claim"]["parent"]
        with self.lock(f"tier-{tier}"):  # one merge into a tier at a time: its recorded commit cannot move under it
            return self._merge(feature, local)

    def _merge(self, feature: str, local: dict[str, Any]) -> dict[str, Any]:
        doc = self.in_flight("merge", feature)
        c = doc["transitions"]["claim"]
        tier, fsubject = c["parent"], self.tb.store.find(c["db_branch"])
        target = Subject(name=tier, kind="tier", protected=self.tb.config.tiers[tier].protected, tier=tier)
        source = self.tb.gate.subject(fsubject) if fsubject is not None else None
        decision = self.tb.gate.decide(self.tb.actor, Action.PROMOTE, target, source)
        if not decision.allowed:  # before anything about the feature: a refused merger learns nothing
            self.tb.gate.audit.append(actor=self.me, action="flow.merge", target=feature, allowed=False,
                                      reason=f"{decision.rule}: {decision.reason}", outcome="refused")
            raise GateFailed("merge", [Failure("promotion-refused", f"{self.me} may not merge into tier {tier!r}: "
                                               f"{decision.reason}", "Ask a developer or CI to run `tierbase flow "
                                               "merge` (policy has no override)", {"rule": decision.rule})])
        if doc["state"] != FlowState.CI_GREEN:
            self.refuse(feature, "merge", [Failure("wrong-state", f"`flow merge` needs state ci-green, and the state "
                                                   f"is {doc['state']}", "Run CI first: `tierbase flow ci`")])
        ci, ready = doc["transitions"]["ci"], doc["transitions"]["ready"]
        failures = local_failures(c, local) if c.get("owner") == self.me else []
        head = local.get("head")
        if head and head != ci.get("sha"):
            failures.append(Failure("head-changed-since-ci", f"HEAD is {str(head)[:10]}, but the green CI run was "
                                    f"for {str(ci.get('sha'))[:10]}", "Prepare and test it again: `tierbase flow "
                                    "ready` then `tierbase flow ci`", {"head": head, "ci_sha": ci.get("sha")}))
        recorded = self.tiers()[tier]
        feature_sha = self.repo.sha(f"refs/tierbase/features/{feature}")
        if ci.get("sha") != ready.get("head_sha") or feature_sha != ci.get("sha"):
            failures.append(Failure("ci-evidence-stale", "the green run is not for the prepared commit",
                                    "Run `tierbase flow ready` and `tierbase flow ci` again"))
        if failures:
            self.refuse(feature, "merge", failures)
        sha = str(ci["sha"])
        merge_sha, text = self.repo.merge(recorded["sha"], sha, f"Merge feature {feature} into "
                                          f"{recorded['git_branch']} (tierbase flow merge)")
        if merge_sha is None:
            self.refuse(feature, "merge", [Failure("merge-conflict", f"{c['git_branch']} does not merge cleanly into "
                                                   f"{recorded['git_branch']}: {text[:300]}",
                                                   f"Merge {recorded['git_branch']} into your branch, resolve, "
                                                   "commit, then ready and ci again")])
        said = [f"merged {c['git_branch']} ({sha[:10]}) into {recorded['git_branch']} on the platform's repository "
                f"({merge_sha[:10]})"]
        promotion: dict[str, Any] | None = None
        with self.migrations_at(merge_sha, recorded["sha"]) as (mdir, files):
            try:
                pending = self.tb.migrate_status(tier, str(mdir)).get("pending", []) if files else []
                if pending:
                    promotion = self.tb.promote(tier, source=c["db_branch"], migrations_dir=str(mdir))
                    said.append(f"promoted {len(pending)} migration(s) of {feature!r} into tier {tier!r}")
                elif files:
                    said.append(f"tier {tier!r} has every migration already: nothing to promote")
            except TierbaseError as err:
                # nothing moved in git (the tier's ref is set below, after success): nothing is merged
                code = "promotion-refused" if isinstance(err, PolicyDenied) else "promotion-failed"
                self.refuse(feature, "merge", [Failure(code, err.message, err.hint, {"error": err.to_dict()})])
        self.repo.set_ref(f"refs/heads/{recorded['git_branch']}", merge_sha, old=recorded["sha"])
        with self.tb.store.write() as db:
            db.execute("UPDATE flow_tiers SET sha=?, at=?, by=? WHERE tier=?", (merge_sha, time.time(), self.me, tier))
        try:
            self.tb.delete_branch(c["db_branch"], recursive=True)
            said.append(f"deleted database branch {c['db_branch']!r}")
            deleted: bool | str = True
        except TierbaseError as err:
            deleted = err.message
            said.append(f"could not delete database branch {c['db_branch']!r}: {err.message}")
        self.repo.delete_ref(f"refs/tierbase/features/{feature}")
        evidence = {"merge_sha": merge_sha, "feature_sha": sha, "tier": tier, "tier_git_branch": recorded["git_branch"],
                    "tier_sha_before": recorded["sha"], "merged_at": iso(time.time()), "promotion": promotion,
                    "feature_branch_deleted": deleted, "migrations": files}
        self.record(feature, Transition.MERGE, FlowState.MERGED, evidence)
        ws = c.get("workspace")
        if ws and _pointer(self.history.events(str(ws))) == feature:
            self.record(str(ws), Transition.MERGE, FlowState.MERGED, {"feature": feature})
        return {"said": said, **self.tier_refs()}

    # == abandon ======================================================================================
    def abandon(self, feature: str, local: dict[str, Any]) -> dict[str, Any]:
        doc = self.in_flight("abandon", feature)
        self.owner_only("abandon", feature, doc)
        c = doc["transitions"]["claim"]
        if doc["state"] not in IN_FLIGHT:
            self.refuse(feature, "abandon", [Failure("wrong-state", f"`flow abandon` needs a feature in flight, and "
                                                     f"the state of {feature!r} is {doc['state']}")])
        failures = [Failure("dirty-worktree", f"uncommitted code: {', '.join(map(str, local['dirty'][:8]))}",
                            "Commit or stash it first: abandoning switches back to the tier's git branch")] \
            if local.get("dirty") else []
        if failures:
            self.refuse(feature, "abandon", failures)
        said = []
        try:
            gone = self.tb.delete_branch(c["db_branch"], recursive=True)
            said.append(f"deleted database branch(es) {', '.join(gone)}")
        except BranchNotFound:
            said.append(f"database branch {c['db_branch']!r} was already gone")
        self.repo.delete_ref(f"refs/tierbase/features/{feature}")
        evidence = {"feature": feature, "from_state": str(doc["state"]),
                    "git_branch_kept": not local.get("delete_git_branch")}
        self.record(feature, Transition.ABANDON, FlowState.SCAFFOLD_COMPLETE, evidence)
        ws = c.get("workspace")
        if ws and _pointer(self.history.events(str(ws))) == feature:
            self.record(str(ws), Transition.ABANDON, FlowState.SCAFFOLD_COMPLETE, {"feature": feature})
        return {"said": said, "evidence": evidence}

    # == TDD verbs: the roles are the server's to check ====================================================
    def tdd(self, feature: str) -> dict[str, Any]:
        return dict(self.doc(feature).get("tdd") or {})

    def _tdd_begin(self, gate: str, feature: str, authorize: Callable[[dict[str, Any], dict[str, Any]], Failure | None],
                   *, enabled: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """The feature's TDD fold, after ``authorize`` (a role check, before any state is looked at)."""
        doc = self.in_flight(gate, feature)
        t = {"roles": {}, "artifacts": {}, "items": {}, "baselines": {}, **dict(doc.get("tdd") or {})}
        refused = authorize(doc, t)
        if refused is not None:
            self.deny(gate, feature, refused.code, refused.message, refused.hint)
        if doc["state"] not in IN_FLIGHT:
            self.refuse(feature, gate, [Failure("no-feature", "the TDD layer works on a claimed feature; the state "
                                                f"is {doc['state']}", "Claim one: `tierbase flow claim FEATURE`")])
        if enabled and not t.get("enabled"):
            self.refuse(feature, gate, [Failure("tdd-not-enabled", f"TDD is not enabled for {feature!r}",
                                                "Enable it: `tierbase tdd enable`")])
        return doc, t

    def _owner(self, doc: dict[str, Any], t: dict[str, Any]) -> Failure | None:
        owner = doc["transitions"]["claim"].get("owner")
        if owner == self.me or self.base_role() == "platform-engineer":
            return None
        return Failure("not-feature-owner", f"{self.me!r} does not own feature {doc['feature']!r} (claimed by "
                       f"{owner!r})", "Only the principal that claimed a feature enables TDD on it")

    def _holds(self, t: dict[str, Any], role: str) -> Failure | None:
        if t["roles"].get(role) != self.me:
            return Failure("not-your-role", f"{self.me!r} is not the {role} of this feature "
                           f"(the {role} is {t['roles'].get(role) or 'not assigned'})",
                           f"The {role} does this; roles are assigned with `tierbase tdd assign`")
        clash = [b if a == role else a for a, b in CONFLICTS if role in (a, b)]
        clash = [o for o in clash if t["roles"].get(o) == self.me]
        if clash:
            return Failure("role-conflict", f"{self.me!r} is also the {clash[0]}: one principal cannot be both",
                           "Reassign one of the roles")
        return None

    def tdd_enable(self, feature: str) -> dict[str, Any]:
        doc, t = self._tdd_begin("tdd-enable", feature, self._owner, enabled=False)
        if not t.get("enabled"):
            self.record(feature, "tdd-enable", str(doc["state"]), {})
        return {"feature": feature}

    def tdd_assign(self, feature: str, role: str, principal: str) -> dict[str, Any]:
        if self.base_role() == "agent":
            self.deny("tdd-assign", feature, "agent-cannot-assign", "agents cannot hand out TDD roles",
                      "A developer or platform engineer assigns the roles")
        doc, t = self._tdd_begin("tdd-assign", feature, lambda d, t: None)  # any developer: agents refused above
        failures = []
        if role not in ROLES:
            failures.append(Failure("unknown-role", f"{role!r} is not a TDD role", f"Use one of: {', '.join(ROLES)}"))
        try:
            self.tb.gate.principals.get(principal)
        except TierbaseError:
            failures.append(Failure("unknown-principal", f"no principal {principal!r}", "Assign an existing one"))
        roles = {**t.get("roles", {}), role: principal}
        for a, b in CONFLICTS:
            if roles.get(a) is not None and roles.get(a) == roles.get(b) and role in (a, b):
                failures.append(Failure("role-conflict", f"{principal!r} cannot be both {a} and {b} on a feature",
                                        "Give the role to another principal"))
        if failures:
            self.refuse(feature, "tdd-assign", failures)
        self.record(feature, "tdd-assign", str(doc["state"]), {"role": role, "principal": principal})
        return {"feature": feature}

    def tdd_submit(self, feature: str, artifact: str, sha256: str) -> dict[str, Any]:
        doc, _ = self._tdd_begin("tdd-submit", feature,
                                 lambda d, t: self._holds(t, ARTIFACTS[artifact]) if artifact in ARTIFACTS else None)
        if artifact not in ARTIFACTS:
            self.refuse(feature, "tdd-submit", [Failure("unknown-artifact", f"{artifact!r} is not a TDD artifact")])
        self.record(feature, "tdd-submit", str(doc["state"]), {"artifact": artifact, "sha256": sha256,
                                                               "path": f".tierbase/tdd/{feature}/{artifact}.json"})
        return {"feature": feature}

    def tdd_approve(self, feature: str, artifact: str, sha256: str, fingerprints: dict[str, Any],
                    items: list[str]) -> dict[str, Any]:
        def own(d: dict[str, Any], t: dict[str, Any]) -> Failure | None:
            art = t["artifacts"].get(artifact)
            if art is not None and art["submitted"]["by"] == self.me:
                return Failure("self-approval", f"{self.me!r} submitted the {artifact}; someone else approves it",
                               "Another principal runs `tierbase tdd approve`")
            return None

        doc, t = self._tdd_begin("tdd-approve", feature, own)
        art = t["artifacts"].get(artifact)
        if art is None:
            self.refuse(feature, "tdd-approve", [Failure("not-submitted", f"no {artifact} was submitted")])
        if art["sha256"] != sha256:
            self.refuse(feature, "tdd-approve", [Failure("artifact-drift", f"the {artifact} to approve is not the "
                                                         "one submitted", "Submit it again")])
        evidence: dict[str, Any] = {"artifact": artifact, "sha256": sha256}
        if artifact == "test-list":
            evidence.update(items=list(items), fingerprints=dict(fingerprints))
        self.record(feature, "tdd-approve", str(doc["state"]), evidence)
        return {"feature": feature}

    def tdd_red(self, feature: str, item: str, test: str, fingerprint: str) -> dict[str, Any]:
        doc, t = self._tdd_begin("tdd-red", feature, lambda d, t: self._holds(t, "navigator"))
        if item in t.get("items", {}):
            self.refuse(feature, "tdd-red", [Failure("red-recorded", f"{item} went RED already")])
        self.record(feature, "tdd-red", str(doc["state"]), {"item": item, "test": test, "fingerprint": fingerprint})
        return {"feature": feature}

    def tdd_green(self, feature: str, items: list[str], sha: str | None, passed: int) -> dict[str, Any]:
        doc, t = self._tdd_begin("tdd-green", feature, lambda d, t: self._holds(t, "driver"))
        pending = [i for i, v in t.get("items", {}).items() if v.get("green") is None]
        if sorted(items) != sorted(pending) or not pending:
            self.refuse(feature, "tdd-green", [Failure("nothing-red", "the items to turn GREEN are not the RED ones",
                                                       "The navigator records RED first: `tierbase tdd red`")])
        self.record(feature, "tdd-green", str(doc["state"]), {"items": pending, "sha": sha, "passed": passed})
        return {"feature": feature}

    def tdd_ready_failures(self, feature: str, doc: dict[str, Any], head: str) -> list[Failure]:
        """With TDD on: the tests the approved list names are intact at the commit, by the platform's reading."""
        t = doc.get("tdd") or {}
        if not t.get("enabled"):
            return []
        out = []
        arts = t.get("artifacts", {})
        open_gates = [a for a in ARTIFACTS if not (arts.get(a) or {}).get("approved")]
        if open_gates:
            out.append(Failure("tdd-gate-open", f"TDD: the {open_gates[0]} gate is not approved yet",
                               "Every artifact is approved before pr-ready"))
        listed: list[str] = []
        for e in self.events(feature):
            if e["transition"] == "tdd-approve" and e["evidence"].get("artifact") == "test-list":
                listed = list(e["evidence"].get("items", []))
        missing = [i for i in listed if ((t.get("items") or {}).get(i) or {}).get("green") is None]
        if not open_gates and missing:
            out.append(Failure("tdd-incomplete", f"TDD: test-list items not GREEN yet: {', '.join(missing)}",
                               "Every item goes RED (navigator) then GREEN (driver) before pr-ready"))
        for test, fp in sorted((t.get("baselines") or {}).items()):
            if fp is None:
                continue
            now = inventory.fingerprint_at(self.repo, head, test)
            if now is None:
                out.append(Failure("tdd-test-deleted", f"TDD: {test} was deleted or renamed away at {head[:10]}",
                                   "Restore it; changing the test list needs a re-approved test-list.json",
                                   {"test": test}))
            elif now != fp:
                out.append(Failure("tdd-test-modified", f"TDD: {test} changed since it was recorded (RED or approval)",
                                   "Restore it; weakening a test needs a re-approved test-list.json", {"test": test}))
        return out


def job_command(flow: Flow, ready: dict[str, Any]) -> str:
    return str(flow.project_config(str(ready.get("tier_sha", ""))).get("test_command", DEFAULT_TEST_COMMAND)) \
        if ready.get("tier_sha") else DEFAULT_TEST_COMMAND


def local_failures(c: dict[str, Any], local: dict[str, Any]) -> list[Failure]:
    """What the client reports of its working copy: able to refuse, never to grant."""
    out = []
    want, now = c.get("git_branch"), local.get("git_branch")
    if "git_branch" in local and want and now != want:
        out.append(Failure("wrong-git-branch", f"the checked-out git branch is {now or '(detached)'!r}, "
                           f"not the claimed {want!r}", f"Switch to it: `git checkout {want}`"))
    dirty = [str(p) for p in local.get("dirty") or []]
    if dirty:
        out.append(Failure("dirty-worktree", f"uncommitted code: {', '.join(dirty[:8])}"
                           + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else ""),
                           "Commit (or stash) your changes first", {"paths": dirty}))
    return out


def ci_failures(run: testrun.RunResult, baseline: dict[str, Any]) -> list[Failure]:
    out = []
    if run.failed or run.errors:
        out.append(Failure("tests-failed", f"{run.failed} failed and {run.errors} errored: "
                           f"{', '.join(run.failures[:10]) or run.output.strip()[-300:]}",
                           "Fix the code (not the tests), commit, then `tierbase flow ready` and `tierbase flow ci`",
                           {"failures": run.failures[:50], "output": run.output[-2000:]}))
    need_active = int(baseline.get("total", 0)) - int(baseline.get("inactive", 0))
    if run.total < int(baseline.get("total", 0)) or run.passed < need_active:
        out.append(Failure("fewer-tests-than-tier", f"{run.total} tests ran ({run.passed} passed); the tier's "
                           f"suite has {baseline.get('total')} ({need_active} that run)",
                           "Every test of the tier must still run and pass"))
    return out


def _pointer(events: list[dict[str, Any]]) -> str | None:
    from .state import workspace_pointer

    return workspace_pointer(events)
