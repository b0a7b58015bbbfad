"""The proxy's questions and the credentials of a principal on a compute.

``Logins`` takes the core and the renewals (a login on a leased branch renews its lease). The
decision is the policy's (governance/access.py maps it to a fixed role); a platform engineer's own
TCP login on a compute is made by the provider (``Provider.direct_login``).
"""

from __future__ import annotations

from collections.abc import Callable

from .app_base import Core
from .app_leases import Renewals
from .control.store import Branch
from .errors import InvalidInput, PolicyDenied
from .governance.access import compute_role, connect_action


class Logins:
    def __init__(self, core: Core, renewals: Renewals) -> None:
        self.core = core
        self.renewals = renewals

    def login_verifier(self, user: str) -> str | None:
        """The SCRAM verifier principal ``user`` logs in to the proxy with (None: unknown or revoked)."""
        return self.core.gate.principals.verifier(user)

    def connect_role(self, user: str, branch: str, *, audit: bool = True,
                     later: Callable[[Callable[[], None]], None] | None = None) -> str:
        """May principal ``user`` connect to ``branch``, and as which compute role? PolicyDenied if not.

        Owners of a branch and platform engineers get ``tb_owner``; everyone else the policy lets in
        gets ``tb_reader``; the audit trail's own cluster is read-only for all.
        """
        gate = self.core.gate
        b = self.core.store.get(branch)
        who = gate.principal(user)
        action, subject = connect_action(gate, b)
        decision = gate.decide(user, action, subject)
        if audit:
            gate.audit_windowed(actor=who.name, action=f"{action.value}.proxy", target=b.name,
                                allowed=decision.allowed, reason=f"{decision.rule}: {decision.reason}", later=later)
        if not decision.allowed:
            raise PolicyDenied(action.value, b.name, decision.reason, decision.rule)
        if audit:  # a login on a leased branch is activity: it renews the lease (throttled, off the loop)
            self.renewals.renew_on_activity(b.name, later)
        return compute_role(self.core.config, who, b, subject)

    def direct_login(self, b: Branch, principal: str) -> str:
        """A platform engineer's own TCP login role on one compute (member of tb_owner and tb_direct)."""
        verifier = self.core.gate.principals.verifier(principal)
        if verifier is None:
            raise InvalidInput(f"principal {principal!r} has no database password yet",
                               "Use its token once with the CLI or API, then ask again")
        return self.core.branches.provider.direct_login(b.port, principal, verifier)
