"""The policy engine: every control-plane action is decided here, with a reason.

Order of evaluation, first match wins:
0. read-only roles (``roles.X.read_only``) may only read,
1. built-in agent rules (hold whatever the config says; no override exists),
2. protection of protected tiers (a state a rollback or restore kept: until a platform engineer
   deletes it),
3. the platform-engineer role,
4. the declared rules of tierbase.toml (tier `branch`/`promote` lists, grants),
5. ownership (a principal may do what it likes with the branches it created),
6. otherwise denied.

Rules follow lineage: a Subject carries the declared tier whose data it holds (``tier``) and that
tier when protected (``protected_tier``), so a snapshot, a rollback branch or any descendant of a
tier is decided as that tier, whatever it is named. tierbase.toml cannot loosen step 1: a config
that tries (a role like a stronger one, grants or promote lists naming agent roles) is refused
when it is loaded (config.py), not overridden here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import InvalidInput
from .config import Config
from .principals import Principal


class Action(StrEnum):
    BRANCH_CREATE = "branch.create"      # target: the parent
    BRANCH_DELETE = "branch.delete"
    BRANCH_RESET = "branch.reset"
    BRANCH_START = "branch.start"
    BRANCH_STOP = "branch.stop"
    BRANCH_CONNECT = "branch.connect"    # receive Postgres credentials for the branch
    BRANCH_SQL = "branch.sql"            # run SQL through the API: decided as branch.connect
    BRANCH_IMPORT = "branch.import"
    ROUTE_SET = "route.set"
    PROMOTE = "promote"                  # target: the tier promoted into; source: where from
    MIGRATE = "migrate.apply"
    UNMASKED = "data.unmasked"           # create a branch of sensitive data without masking
    POLICY_RELOAD = "policy.reload"
    PRINCIPAL_MANAGE = "principal.manage"
    AUDIT_READ = "audit.read"
    MASKING_REFRESH = "masking.refresh"  # re-make a tier's masked image (app_images.py)


#: what a read-only role may still do: read (connect as tb_reader, SQL as tb_reader, the trail), wake a compute
READS = frozenset({Action.BRANCH_CONNECT, Action.BRANCH_SQL, Action.BRANCH_START, Action.AUDIT_READ})


def parse_action(text: str) -> Action:
    try:
        return Action(text)
    except ValueError as err:
        raise InvalidInput(f"unknown action {text!r}", f"Use one of: {', '.join(a.value for a in Action)}") from err


@dataclass(frozen=True)
class Subject:
    """What an action is about: a branch (or tier), as the policy needs to see it."""

    name: str
    kind: str = "feature"          # tier | feature | snapshot | none (not a branch: policy, principals)
    protected: bool = False
    owner: str | None = None
    #: the declared tier whose data this is: itself, or the nearest declared tier it descends from
    #: (a snapshot, a rollback branch, a branch of a branch of it), whatever the branch is named
    tier: str | None = None
    #: that tier when it is protected: whatever holds a protected tier's data is that tier for agents
    protected_tier: str | None = None
    #: the sensitive tier whose data it holds unmasked (no masking on the way down from it)
    unmasked_of: str | None = None
    #: a state a rollback or a restore kept (protected, tier-kind, serving no declared tier)
    kept: bool = False
    #: what the platform keeps it for, when it is the platform's alone (a masked image, its source; names.py)
    platform_only: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "rule": self.rule}


def allow(rule: str, reason: str) -> Decision:
    return Decision(True, reason, rule)


def deny(rule: str, reason: str) -> Decision:
    return Decision(False, reason, rule)


class PolicyEngine:
    def __init__(self, config: Config) -> None:
        self.config = config

    def decide(self, who: Principal, action: Action, target: Subject, source: Subject | None = None) -> Decision:
        role = self.config.base_role(who.role)
        if self.config.read_only(who.role) and action not in READS:
            return deny("role.read-only", f"{who.role!r} is a read-only role: it cannot do {action.value}")
        if action is Action.BRANCH_SQL:  # SQL through the platform is a connection through it: the same rules
            action = Action.BRANCH_CONNECT
        for step in (self._agent_rules, self._protection, self._platform_engineer, self._platform_only,
                     self._unmasked, self._declared, self._ownership):
            got = step(who, role, action, target, source)
            if got is not None:
                return got
        return deny("default.deny", f"no rule lets a {who.role} do {action.value} on {target.name!r}")

    # 1 -------------------------------------------------------------------------
    def _agent_rules(self, who: Principal, role: str, action: Action, target: Subject,
                     source: Subject | None) -> Decision | None:
        if role != "agent":
            return None
        lineage = self._protected_lineage(target)
        if (action is Action.BRANCH_CREATE and lineage is not None
                and (lineage != self.config.entry or lineage == self.config.root)):
            # features fork from the entry tier; every other protected tier, and whatever holds its
            # data (its snapshots, rollback branches, descendants), is out of an agent's reach
            what = (f"the protected tier {lineage!r}" if target.name == lineage else
                    f"{target.name!r}, which holds the data of the protected tier {lineage!r} "
                    f"(a {target.kind} descending from it)")
            return deny("builtin.agent-no-branch-off-protected",
                        f"agents cannot create branches off {what}; "
                        f"branch off the entry tier {self.config.entry!r} instead")
        if action is Action.PROMOTE:
            return deny("builtin.agent-no-promote", "agents cannot promote between tiers")
        if action is Action.MIGRATE and target.owner != who.name:
            return deny("builtin.agent-migrate-own-only",
                        f"agents can apply migrations only to branches they own ({target.name!r} is not theirs)")
        if action is Action.ROUTE_SET:
            return deny("builtin.agent-no-repoint", "agents cannot repoint routes")
        if action in (Action.POLICY_RELOAD, Action.PRINCIPAL_MANAGE):
            return deny("builtin.agent-no-policy", "agents cannot change policy or principals")
        if (action is Action.BRANCH_CONNECT and lineage is not None and target.kind != "feature"
                and target.owner != who.name):
            return deny("builtin.agent-no-credentials-on-protected",
                        f"agents get no database credentials on {target.name!r}: it is (or holds the data "
                        f"of) the protected tier {lineage!r}")
        return None

    def _protected_lineage(self, target: Subject) -> str | None:
        """The protected tier whose data ``target`` holds (a subject built without lineage: itself)."""
        if target.protected_tier is not None:
            return target.protected_tier
        if target.kind == "tier" and target.protected:
            return target.name
        spec = self.config.tiers.get(target.tier) if target.tier else None
        return target.tier if spec is not None and spec.protected else None

    # 2 -------------------------------------------------------------------------
    def _protection(self, who: Principal, role: str, action: Action, target: Subject,
                    source: Subject | None) -> Decision | None:
        if target.kept and action is Action.BRANCH_DELETE and role == "platform-engineer":
            return None  # protected until a platform engineer deletes it (step 3 allows): kept for them
        if target.protected and action in (Action.BRANCH_DELETE, Action.BRANCH_RESET):
            return deny("tier.protected", f"{target.name!r} is a protected tier: it cannot be deleted or reset")
        if target.protected and action is Action.MIGRATE:
            return deny("tier.protected",
                        f"{target.name!r} is a protected tier: migrations reach it only through `tierbase promote`")
        if action is Action.PROMOTE and source is not None and source.kind != "tier" and source.tier != target.name:
            return deny("promote.tiers-only",
                        f"{source.name!r} is a {source.kind} branch: features merge into their tier "
                        f"({source.tier!r}), they are never promoted past it")
        if action is Action.PROMOTE and target.kind != "tier":
            return deny("promote.tiers-only", f"{target.name!r} is not a tier")
        return None

    # 3 -------------------------------------------------------------------------
    def _platform_engineer(self, who: Principal, role: str, action: Action, target: Subject,
                           source: Subject | None) -> Decision | None:
        if role == "platform-engineer":
            return allow("role.platform-engineer", "platform engineers may do this")
        return None

    # 3a ------------------------------------------------------------------------
    def _platform_only(self, who: Principal, role: str, action: Action, target: Subject,
                       source: Subject | None) -> Decision | None:
        """The platform's own work, for platform engineers only (step 3 allowed them): re-making masked
        images, and the images and their unmasked sources themselves. A masked branch of a tier is
        cloned from its image by the platform when one branches the tier; a branch of the image or of
        its source by hand would pin what the next refresh must be free to remove."""
        if action is Action.MASKING_REFRESH:
            return deny("builtin.platform-engineers-only",
                        f"only platform engineers re-make masked images; a {who.role}'s masked branches are "
                        "cloned from the current image, which promotions and the schedule keep fresh")
        if target.platform_only is not None and action is not Action.AUDIT_READ:
            tier = f" {target.tier!r}" if target.tier else ""
            return deny("builtin.platform-only",
                        f"{target.name!r} is one of {target.platform_only}, kept by the platform for itself; "
                        f"branch the tier{tier} instead (a masked branch of it is cloned from its image)")
        return None

    # 3b ------------------------------------------------------------------------
    def _unmasked(self, who: Principal, role: str, action: Action, target: Subject,
                  source: Subject | None) -> Decision | None:
        """Credentials on unmasked sensitive data need the unmasked-read grant, whoever owns the branch:
        masking its children protects nothing if anyone may read the tier itself."""
        if action is not Action.BRANCH_CONNECT or target.unmasked_of is None:
            return None
        allowed = self.config.grants.get("unmasked_read", ())
        if who.role in allowed:
            return None
        return deny("grants.unmasked_read", f"{target.name!r} holds the data of the sensitive tier "
                    f"{target.unmasked_of!r} unmasked, and only {', '.join(allowed) or 'nobody'} hold the "
                    "unmasked_read grant; work on a masked branch of it")

    # 4 -------------------------------------------------------------------------
    def _declared(self, who: Principal, role: str, action: Action, target: Subject,
                  source: Subject | None) -> Decision | None:
        tiers = self.config.tiers
        if action is Action.BRANCH_CREATE and target.kind == "tier":
            # a tier branch no longer serving its route (an older rollback) keeps its tier's rules
            name = target.tier or target.name
            allowed = tiers[name].branch if name in tiers else None
            if allowed is None:
                return allow("default.branch-off-tier", f"any principal may branch off tier {name!r}")
            if who.role in allowed:
                return allow(f"tiers.{name}.branch", f"{who.role} may branch off {name!r}")
            return deny(f"tiers.{name}.branch", f"only {', '.join(allowed) or 'nobody'} may branch off {name!r}")
        if action is Action.PROMOTE:
            allowed = tiers[target.name].promote if target.name in tiers else ()
            if who.role in allowed:
                return allow(f"tiers.{target.name}.promote", f"{who.role} may promote into {target.name!r}")
            return deny(f"tiers.{target.name}.promote",
                        f"only {', '.join(allowed) or 'nobody'} may promote into {target.name!r}")
        grant = {Action.ROUTE_SET: "repoint", Action.UNMASKED: "unmasked_read"}.get(action)
        if grant is not None:
            allowed = self.config.grants.get(grant, ())
            if who.role in allowed:
                return allow(f"grants.{grant}", f"{who.role} holds the {grant} grant")
            return deny(f"grants.{grant}", f"only {', '.join(allowed) or 'nobody'} hold the {grant} grant")
        if action in (Action.BRANCH_DELETE, Action.BRANCH_RESET) and who.role in self.config.grants.get("delete_any",
                                                                                                        ()):
            return allow("grants.delete_any", f"{who.role} holds the delete_any grant")
        if action in (Action.AUDIT_READ, Action.BRANCH_START):
            return allow(f"default.{action.value}", "every principal may do this")
        if action is Action.BRANCH_CONNECT and target.kind == "tier":
            return allow("default.read-tiers", f"read-only credentials on tier {target.name!r}")
        return None

    # 5 -------------------------------------------------------------------------
    def _ownership(self, who: Principal, role: str, action: Action, target: Subject,
                   source: Subject | None) -> Decision | None:
        owned = target.owner == who.name and target.kind != "none"
        if owned and action in (Action.BRANCH_CREATE, Action.BRANCH_DELETE, Action.BRANCH_RESET, Action.BRANCH_STOP,
                                Action.BRANCH_CONNECT, Action.MIGRATE, Action.BRANCH_IMPORT):
            return allow("owner", f"{who.name!r} owns {target.name!r}")
        if action is Action.BRANCH_CREATE and target.tier is not None and target.tier in self.config.tiers:
            allowed = self.config.tiers[target.tier].branch
            if allowed is None or who.role in allowed:
                return allow("tier-descendant", f"{who.role} may branch within tier {target.tier!r}")
        return None
