"""Typed payloads of the main resources: what the API answers (``response_model=``) and the SDK reads.

The facade still builds plain dicts; these models describe them for the OpenAPI document (SDK
generators, agents) and check them on the way out. ``extra="allow"``: a field the facade adds before
a model names it still reaches the client, so typing a response never loses data.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow")


class Branch(Payload):
    """One branch: where it comes from, its compute, its lifetime."""

    name: str
    parent: str | None = Field(description="The branch it was forked from (None for the root)")
    kind: Literal["tier", "feature", "snapshot", "system"]
    state: str = Field(description="creating, ready, resetting or deleting (control/lifecycle.py)")
    protected: bool
    creator: str
    created_at: float = Field(description="Unix time")
    age: str
    fork_lsn: str | None = None
    ttl_seconds: int | None = None
    expires_at: float | None = None
    expires_in: str | None = None
    compute: Literal["running", "stopped", "none"]
    pid: int | None = None
    port: int
    driver: str = Field(description="btrfs (copy-on-write) or copy (O(size))")
    copy_on_write: bool
    masked: bool = False
    masking: Any = Field(default=None, description="The masking rules applied to this branch, if any")
    own_bytes: int | None = Field(default=None, description="Bytes only this branch holds (when measured)")
    elapsed_ms: float | None = Field(default=None, description="Server time of the operation (create)")
    sessions: int | None = Field(default=None, description="Proxied sessions on it now (under the service)")


class Route(Payload):
    """A stable name clients connect to and the branch that serves it."""

    route: str
    branch: str
    movable: bool = Field(description="False for a branch's own name, True for a repointable route")


class Principal(Payload):
    """A human, agent or CI identity."""

    name: str
    role: str
    created_at: float
    created_by: str | None = None
    revoked: bool


class PrincipalCreated(Principal):
    token: str = Field(description="Shown once: the bearer token (and the seed of its Postgres password)")


class AuditRecord(Payload):
    """One record of the tamper-evident trail (HMAC-chained)."""

    id: int
    ts: float
    actor: str
    action: str
    target: str
    decision: Literal["allowed", "denied"]
    reason: str
    outcome: str
    before: Any = None
    after: Any = None
    prev_hash: str
    hash: str


class Deleted(Payload):
    deleted: list[str]


class ErrorBody(BaseModel):
    code: str = Field(description="The condition, e.g. branch_not_found, policy_denied (the SDK's error class)")
    message: str = Field(description="What happened")
    hint: str = Field(description="What to do")
    data: dict[str, Any] = Field(default_factory=dict)
    exit_code: int = Field(1, description="The CLI's exit code for it: 1 error, 2 refused by a rule")


class ErrorEnvelope(BaseModel):
    """Every error of the API, whatever its status."""

    error: ErrorBody


#: the error answers every operation may give, for the OpenAPI document
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": what}
    for status, what in ((400, "Bad input"), (401, "No or a wrong token"), (403, "Refused by the policy"),
                         (404, "No such branch, route or endpoint"), (409, "Conflict (exists, busy)"),
                         (422, "The request does not validate"), (500, "An unexpected error, translated"),
                         (503, "A compute or the platform is not ready"), (507, "Disk full"))
}
