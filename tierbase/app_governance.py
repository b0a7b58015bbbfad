"""Facade methods of governance: config, principals, policy explain, audit, workflow history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .app_base import NOBODY, FacadeBase
from .control.store import Kind
from .errors import InvalidInput
from .governance.config import load_config
from .governance.policy import Action, Subject, parse_action
from .workflow.history import FlowHistory


class GovernanceOps(FacadeBase):
    # -- governance ----------------------------------------------------------------
    def reload_config(self, path: str | None = None) -> dict[str, Any]:
        """Load tierbase.toml (validated whole before anything changes), then create missing tiers."""
        old = self.config
        with self.gate.act(self.actor, Action.POLICY_RELOAD, NOBODY, before={"sha256": old.digest}) as rec:
            source = path or self.store.get_setting("config_source")
            if source is None:
                raise InvalidInput("no tierbase.toml was given and none was loaded before",
                                   "Pass the path: `tierbase policy reload --file tierbase.toml`")
            cfg = load_config(source)
            self.gate.check_against_branches(cfg)
            said = []
            # tiers first, config last: a failure half way leaves the last good config in force, and a
            # second reload finds the tiers it already made
            for name in cfg.tier_order():
                tier = cfg.tiers[name]
                b = self.store.find(name)
                if b is None and tier.parent is not None:
                    parent = self.store.resolve_route(tier.parent) or tier.parent
                    self.branches.create(name, parent, kind=Kind.TIER, creator=self.gate.owner,
                                         protected=tier.protected)
                    said.append(f"created tier {name!r} from {tier.parent!r}")
                elif b is not None and b.protected != tier.protected:
                    self.store.set_protected(name, tier.protected)
                    said.append(f"tier {name!r} is now {'protected' if tier.protected else 'unprotected'}")
            self.gate.store_config(cfg, str(Path(source).absolute()))
            said.insert(0, f"loaded {source} (sha256 {cfg.digest[:12]})")
            rec.after = {"sha256": cfg.digest, "diff": cfg.diff(old)}
        return {"sha256": cfg.digest, "source": str(source), "said": said, "entry": cfg.entry}

    def show_config(self) -> dict[str, Any]:
        cfg = self.config
        return {"sha256": cfg.digest, "source": self.store.get_setting("config_source"), "text": cfg.text,
                "entry": cfg.entry, "tiers": cfg.tier_order()}

    def explain(self, principal: str, action: str, target: str, source: str | None = None) -> dict[str, Any]:
        """The decision the policy would take, without doing anything."""
        act = parse_action(action)
        subject = self._subject(target) if self.store.find(target) else Subject(name=target, kind="none")
        src = self._subject(source) if source else None
        decision = self.gate.decide(principal, act, subject, src)
        return {"principal": principal, "action": act.value, "target": target, **decision.to_dict()}

    def create_principal(self, name: str, role: str) -> dict[str, Any]:
        if role not in self.config.roles:
            raise InvalidInput(f"role {role!r} is not known", f"Use one of: {', '.join(self.config.roles)}")
        with self.gate.act(self.actor, Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            p, token = self.gate.principals.create(name, role, created_by=self.gate.principal(self.actor).name)
            rec.after = p.to_dict()
        return {**p.to_dict(), "token": token}

    def list_principals(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.gate.principals.all()]

    def revoke_principal(self, name: str) -> dict[str, Any]:
        with self.gate.act(self.actor, Action.PRINCIPAL_MANAGE, Subject(name=name, kind="principal")) as rec:
            rec.after = out = self.gate.principals.revoke(name).to_dict()
        return out

    def audit_log(self, **filters: Any) -> list[dict[str, Any]]:
        self._require(Action.AUDIT_READ, NOBODY, quiet=True)
        return self.gate.audit.query(**filters)

    def audit_verify(self) -> dict[str, Any]:
        return self.gate.audit.verify().to_dict()

    # -- workflow history (the authoritative record behind .tierbase/workflow-state.json) --------
    def flow_record(self, feature: str, transition: str, state: str, evidence: dict[str, Any]) -> dict[str, Any]:
        actor = self.gate.principal(self.actor).name
        out = FlowHistory(self.store).record(feature, transition, state, actor, evidence)
        self.gate.audit.append(actor=actor, action=f"flow.{transition}", target=feature, allowed=True,
                               reason="workflow transition whose gates passed", after={"state": state})
        return out

    def flow_history(self, feature: str) -> dict[str, Any]:
        return FlowHistory(self.store).summary(feature)

    def whoami(self) -> dict[str, Any]:
        p = self.gate.principal(self.actor)
        return {**p.to_dict(), "base_role": self.config.base_role(p.role)}


