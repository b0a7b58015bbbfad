"""Who connects to a branch as which fixed compute role (the proxy, SQL over the API, branch URLs).

The policy decides whether a principal may connect (``branch.connect``; the audit trail's own
cluster is ``audit.read``); this module says what that is asked as, and which role the answer
maps to: owners of a branch and platform engineers get ``tb_owner``, everyone else the policy
lets in ``tb_reader``; read-only roles and the audit cluster read only.
"""

from __future__ import annotations

from ..control.store import Branch, Kind
from ..provider import OWNER_ROLE, READER_ROLE
from .config import Config
from .gate import Gate
from .policy import Action, Subject
from .principals import Principal


def connect_action(gate: Gate, b: Branch) -> tuple[Action, Subject]:
    """The action a connection to ``b`` is decided as, on which subject."""
    if b.kind is Kind.SYSTEM:
        return Action.AUDIT_READ, Subject(name=b.name, kind="none")
    return Action.BRANCH_CONNECT, gate.subject(b)


def compute_role(config: Config, who: Principal, b: Branch, subject: Subject) -> str:
    """The role an allowed connection of ``who`` to ``b`` logs in as."""
    if b.kind is Kind.SYSTEM or config.read_only(who.role):  # read-only roles read, wherever they are
        return READER_ROLE
    if config.base_role(who.role) == "platform-engineer" or subject.owner == who.name:
        return OWNER_ROLE
    return READER_ROLE
