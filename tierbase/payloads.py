"""Typed payloads: what the facade returns, the API answers (``response_model=``) and the SDK reads.

One model per answer of the HTTP API, built from what the facade really returns. The facade still
builds plain dicts; the API checks them against these models on the way out (so the OpenAPI document
describes every response, for SDK generators and agents), and the SDK names them in its return types
(``Annotated[dict[str, Any], Model]``) and can check what it receives (``Client(check=True)``).

``extra="allow"``: a field the facade adds before a model names it still reaches the client, so typing
a response never loses data; the API tests list the extras they see, so drift is noticed.

A leaf module (tests/test_layers.py): pydantic only, nothing of tierbase, so the facade, the API and the
SDK can all import it. The CLI does not: pydantic costs more to import than a CLI call may take.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _said() -> Any:
    return Field(description="What was done, one sentence a line (the CLI prints them)")


# -- platform ---------------------------------------------------------------------------------------
class Health(Payload):
    """The service answers (no token needed)."""

    ok: bool
    version: str


class Space(Payload):
    """The storage pool: free space, the reserve kept for tiers, the features' limit (control/space.py)."""

    total: int = Field(description="Bytes of the pool")
    free: int = Field(description="Bytes free in the pool")
    reserve: int = Field(description="Bytes kept for tiers: new branches are refused below it")
    warn_below: int = Field(description="Free bytes under which `status` warns")
    isolation: Literal["quota", "reserve"] = Field(
        description="quota: feature branches are held to a limit (btrfs simple quotas); reserve: the create check only")
    features_used: int | None = Field(default=None, description="Bytes the feature branches hold (under quota)")
    features_limit: int | None = Field(default=None, description="Bytes the feature branches may hold (under quota)")
    warning: str | None = Field(default=None, description="Why space is short, and what to do; None when fine")


class Status(Payload):
    """The platform at a glance; the service adds its own pid and ports."""

    home: str = Field(description="The data directory (TIERBASE_HOME)")
    driver: str = Field(description="btrfs, copy, fake, or a remote provider's name")
    copy_on_write: bool
    postgres: dict[str, Any] = Field(description="The postgres server in use: bindir, major")
    compute_user: str = Field(description="The OS user computes run as")
    branches: int
    computes_running: int
    space: Space
    warnings: list[str] = Field(description="Time travel's archiving problems, if any")
    service_pid: int | None = None
    api_port: int | None = None
    proxy_port: int | None = None
    idle_timeout: float | None = Field(default=None, description="Seconds before an idle compute is suspended")
    masked_images: list[ImageState] = Field(default_factory=list, description="Each image tier's masked image")


# -- branches ---------------------------------------------------------------------------------------
class TimeTarget(Payload):
    time: str | None = None
    lsn: str | None = None
    inclusive: bool = True


class MaskedImage(Payload):
    image: str = Field(description="The tier's masked image the branch was cloned from")
    tier_branch: str
    as_of: float = Field(description="Unix time the image was made")


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
    masking: list[str] | None = Field(default=None, description="The masking rules applied to this branch ([] if none)")
    own_bytes: int | None = Field(default=None, description="Bytes only this branch holds (when measured)")
    elapsed_ms: float | None = Field(default=None, description="Server time of the operation (create)")
    sessions: int | None = Field(default=None, description="Proxied sessions on it now (under the service)")
    masked_image: MaskedImage | None = Field(default=None, description="Cloned from the tier's masked image")
    target: TimeTarget | None = Field(default=None, description="A branch at a point in time: the point")
    phases: dict[str, Any] | None = Field(default=None, description="A branch at a point in time: ms per phase")


class Deleted(Payload):
    deleted: list[str] = Field(description="The branches deleted, leaves first")


class BranchUrl(Payload):
    name: str
    url: str = Field(description="A postgresql:// URL through the proxy (or direct), with the caller's credentials")


class SqlResult(Payload):
    """Rows of the last statement as JSON (bytea as {"base64": ...}), run in one transaction."""

    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: bool = Field(description="More rows than max_rows or the size cap: only the first are here")
    truncated_because: str | None = None
    status: str | None = Field(default=None, description="The command tag, e.g. SELECT 3, CREATE TABLE")
    rowcount: int | None = Field(default=None, description="Rows a statement without a result set touched")
    committed: bool = Field(description="False when a cut stream aborted the transaction: nothing was kept")
    branch: str
    database: str
    role: str = Field(description="The compute role it ran as: tb_owner or tb_reader")
    elapsed_ms: float


# -- sessions ---------------------------------------------------------------------------------------
class Session(Payload):
    """A lease on a branch, renewed by activity; the branch goes when the lease ends."""

    id: str = Field(description="ses_<hex>")
    principal: str
    branch: str
    ttl_seconds: int
    started_at: float
    renewed_at: float
    ended_at: float | None = None
    end_reason: str | None = Field(default=None, description="ended, expired or gone")
    live: bool
    expires_at: float | None = None
    expires_in: str | None = None


class SessionStarted(Session):
    branch_info: Branch = Field(description="The leased branch, as `branch create` answers")


class SessionEnded(Session):
    deleted: list[str]


# -- routes -----------------------------------------------------------------------------------------
class Route(Payload):
    """A stable name clients connect to and the branch that serves it."""

    route: str
    branch: str
    movable: bool = Field(description="False for a branch's own name, True for a repointable route")


class RouteMoved(Payload):
    route: str
    branch: str = Field(description="The branch it points to now")
    previous: str | None = Field(description="The branch it pointed to before")
    sessions_ended: int | None = Field(default=None, description="Proxied sessions of the route ended (service)")
    switch_ms: float | None = None


# -- import -----------------------------------------------------------------------------------------
class ImportCheck(Payload):
    branch: str
    database: str
    limit: int = Field(description="The largest dump in bytes the platform takes")


class Imported(Payload):
    branch: str
    database: str
    format: str = Field(description="What the dump was: plain SQL, custom or tar")
    bytes: int
    seconds: float


# -- governance -------------------------------------------------------------------------------------
class Principal(Payload):
    """A human, agent or CI identity."""

    name: str
    role: str
    created_at: float
    created_by: str | None = None
    revoked: bool


class PrincipalCreated(Principal):
    token: str = Field(description="Shown once: the bearer token (and the seed of its Postgres password)")


class WhoAmI(Principal):
    base_role: str = Field(description="The built-in role it derives from (platform-engineer, developer, agent...)")
    read_only: bool
    quota: dict[str, int] = Field(description="Its limits (branches, computes); {} when none")


class PolicyShown(Payload):
    sha256: str
    source: str | None = Field(description="Where the platform engineer read the config (a label)")
    text: str = Field(description="The tierbase.toml in force")
    entry: str = Field(description="The entry tier: the default parent of new branches")
    tiers: list[str] = Field(description="The tiers, parents first")


class PolicyApplied(Payload):
    sha256: str
    source: str
    said: list[str] = _said()
    entry: str
    diff: str = Field(description="Unified diff of the config text, before -> after")
    changed: bool
    applied: bool = Field(description="False for a dry run")


class Decision(Payload):
    allowed: bool
    reason: str
    rule: str = Field(description="The rule that decided")


class Explanation(Decision):
    principal: str
    action: str
    target: str


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


class AuditMirror(Payload):
    ok: bool
    synced_to: int | None = None
    problem: str
    problems: list[str]


class AuditVerify(Payload):
    ok: bool
    records: int
    first_bad: int | None = None
    problem: str
    head: int | None = Field(default=None, description="The newest record the signed head file anchors")
    note: str
    mirror: AuditMirror | None = Field(default=None, description="The SQL mirror against the chain (if any)")


class Url(Payload):
    url: str


class TlsCa(Payload):
    pem: str = Field(description="The CA certificate that signs the proxy's (public)")
    operator_supplied: bool


# -- the workflow -----------------------------------------------------------------------------------
class FlowEvent(Payload):
    id: int
    feature: str
    transition: str
    state: str
    actor: str
    at: float = Field(description="Unix time")
    evidence: dict[str, Any]


class FlowHistory(Payload):
    feature: str
    state: str | None = Field(description="The feature's state now (None: no history)")
    events: list[FlowEvent]
    digest: str


class TierRef(Payload):
    git_branch: str
    sha: str | None = None


class TierRefs(Payload):
    tiers: dict[str, TierRef] = Field(description="tier -> its git branch and accepted commit")
    bundle: str | None = Field(description="base64 git bundle of the tiers' commits")


class FlowRegistered(TierRefs):
    workspace: str
    said: list[str] = _said()


class FlowClaimed(Payload):
    resumed: bool
    feature: str
    said: list[str] = _said()
    evidence: dict[str, Any] | None = None


class FlowSaid(Payload):
    said: list[str] = _said()


class FlowMerged(TierRefs):
    said: list[str] = _said()


class FlowAbandoned(Payload):
    said: list[str] = _said()
    evidence: dict[str, Any]


class ApprovedTests(Payload):
    feature: str
    sha: str
    approved: list[str] = Field(description="The test-change codes waived for this commit")
    said: list[str] = _said()


class CiRun(Payload):
    """One CI run of a feature's commit: queued, running on a runner, done with the platform's verdict."""

    id: int
    feature: str
    sha: str
    state: Literal["queued", "running", "done"]
    requested_by: str
    runner: str | None = None
    requested_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = Field(default=None, description="green, failures, evidence (when done)")
    log: str | None = None


class CiTask(CiRun):
    """A run handed to a runner: where and what to run."""

    tier: str
    tier_sha: str | None = None
    ci_branch: str
    applied: int = Field(description="Migrations applied to the CI branch")
    command: str
    database: str
    bundle: str = Field(description="base64 git bundle of the commit")


class CiTaken(Payload):
    run: CiTask | None = Field(description="The next run to do, or None when nothing is queued")


class TddDone(Payload):
    feature: str


# -- migrations -------------------------------------------------------------------------------------
class MigrationFile(Payload):
    version: int
    name: str
    label: str
    file: str
    checksum: str
    transactional: bool
    undo_file: str | None = None


class MigrationApplied(Payload):
    version: int
    name: str
    label: str
    checksum: str
    duration_ms: float


class MigrationStatus(Payload):
    branch: str
    current_version: int | None
    applied: list[dict[str, Any]] = Field(description="The ledger's rows")
    pending: list[MigrationFile]
    drift: list[dict[str, Any]] = Field(description="Applied files whose checksum changed since")
    missing: list[dict[str, Any]] = Field(description="Applied versions with no file")


class MigrationsApplied(Payload):
    branch: str
    applied: list[MigrationApplied]


class LintFinding(Payload):
    file: str
    line: int = Field(description="1-based")
    column: int = Field(description="1-based")
    rule: str
    level: str = Field(description="warning or error")
    message: str
    help: str | None = None


class LintReport(Payload):
    ok: bool = Field(description="False when a finding blocks")
    findings: list[LintFinding]
    blocking: list[LintFinding]
    block_rules: list[str]


class VerifyReport(Payload):
    ok: bool
    branch: str = Field(description="The throwaway branch it ran on")
    applied: list[dict[str, Any]]
    problems: list[str]
    warnings: list[str]
    checks: dict[str, str] = Field(description="lint, apply, idempotent, reversible -> ok / failed: ... / skipped")
    lint: LintReport | None = None


class Promotion(Payload):
    """One promotion of a tier (migrate/promote.py's log)."""

    id: int
    tier: str
    source: str
    actor: str
    status: Literal["running", "succeeded", "rolled-back", "failed"]
    started_at: float
    finished_at: float | None = None
    duration_ms: int | None = None
    served_by: str | None = Field(default=None, description="The branch that served the tier when it began")
    snapshot: str | None = Field(default=None, description="The read-only pre-promotion snapshot")
    serving_now: str | None = Field(default=None, description="The branch serving the tier when it ended")
    migrations: list[Any]
    reason: str | None = None
    rehearsal: dict[str, Any] | None = Field(default=None, description="The rehearsal under a write load, if run")
    masked_images: list[str] | None = Field(default=None, description="What refreshing the masked image said")


class RollbackPlan(Payload):
    tier: str
    snapshot: str = Field(description="The pre-promotion snapshot it returns to")
    snapshot_age_s: float
    serving: str = Field(description="The branch serving the tier now")
    promotions_undone: list[int]
    migrations_undone: list[str]
    needs_confirmation: bool = Field(description="True: name the snapshot (--to) and confirm (--yes)")
    why_confirm: list[str]


class RollbackSummary(Payload):
    """One rollback of a tier (by hand, of a failed promotion, or finished by reconcile)."""

    rollback: int = Field(description="Its id")
    tier: str
    kind: str = Field(description="manual, automatic or reconcile")
    status: str = Field(description="running, done, failed or abandoned")
    snapshot: str
    serving_now: str
    replaced: str
    replaced_route: str | None = Field(description="The route that reaches the replaced branch")
    discard_writes: bool
    rows_replayed: int
    rows_left: int
    time_added_ms: int
    hold_ms: int
    replay_method: str | None = Field(None, description="How the writes were found: logical (the promotion's "
                                      "slot) or diff; None when discarded")
    replay_fallback: str | None = Field(None, description="Why the data diff ran instead of logical decoding")
    replay: dict[str, Any] = Field(description="Per table: replayed, left and why")
    left_sql: str | None = Field(description="SQL applying the rows not replayed")
    hint: str


class RollbackResult(RollbackPlan):
    """A rollback done (the plan and its summary), or only planned (``dry_run``)."""

    dry_run: bool = False
    rollback: int | None = None
    kind: str | None = None
    status: str | None = None
    serving_now: str | None = None
    replaced: str | None = None
    replaced_route: str | None = None
    discard_writes: bool | None = None
    rows_replayed: int | None = None
    rows_left: int | None = None
    time_added_ms: int | None = None
    hold_ms: int | None = None
    replay_method: str | None = None
    replay_fallback: str | None = None
    replay: dict[str, Any] | None = None
    left_sql: str | None = None
    hint: str | None = None
    seconds_to_first_query: float | None = None
    revert: dict[str, Any] | None = Field(default=None, description="The git commit that reverts the files")


class Restored(Payload):
    tier: str
    serving: str = Field(description="The branch serving the tier now (the restored state)")
    kept_as: str = Field(description="The state replaced, kept (protected)")
    restored_to: str = Field(description="The WAL position recovery ended at")
    target: TimeTarget
    seconds_to_first_query: float
    switch_ms: float | None = None
    hint: str


class TierHistory(Payload):
    """What time travel keeps of a tier: base snapshots, WAL, the window."""

    tier: str
    serving: str
    window: str | None = Field(description="How far back the tier can be restored ([tiers.X] history), e.g. 7d")
    base_interval: str | None = Field(description="How often a base snapshot is taken, e.g. 1h")
    kept_states: list[str] = Field(description="Earlier states kept by restores")
    key: str | None = None
    oldest: dict[str, Any] | None = Field(description="The oldest point it can go back to")
    newest: dict[str, Any] | None = None
    bases: list[dict[str, Any]]
    wal: dict[str, Any] = Field(description="Archived WAL: segments, bytes, oldest, newest, timelines")
    archiver: dict[str, Any] | None = Field(default=None, description="pg_stat_archiver of the running tier")


class SchemaChange(Payload):
    kind: str
    op: str = Field(description="added, removed or changed")
    name: str
    before: Any = None
    after: Any = None
    details: str


class SchemaDiff(Payload):
    a: str
    b: str
    empty: bool
    counts: dict[str, int]
    changes: list[SchemaChange]
    from_: str = Field(alias="from")
    to: str
    text: str | None = Field(description="Rendered as text or markdown (None for json)")


class TableDiff(Payload):
    table: str
    status: str
    note: str | None = None
    primary_key: list[str]
    counts: dict[str, int] = Field(description="inserted, updated, deleted")
    inserted: list[Any]
    deleted: list[Any]
    updated: list[dict[str, Any]] = Field(description="before / after")


class DataDiff(Payload):
    a: str
    b: str
    empty: bool
    stats: dict[str, Any]
    tables: list[TableDiff] = Field(description="The tables that differ")
    from_: str = Field(alias="from")
    to: str
    text: str | None = Field(description="Rendered as text or SQL (None for json)")


# -- served by no endpoint yet: the facade's in-process answers (the payload map names them) ------------
class BaseSnapshot(Payload):
    """A base snapshot of a tier's history (time travel)."""

    id: int
    taken_at: float
    lsn: str
    redo_lsn: str | None = None
    timeline: int | None = None
    reason: str


class MaskingChange(Payload):
    """What migrations do to masked data (migrate/sensitivity.py), read-only."""

    derived: list[dict[str, Any]] = Field(description="Columns filled from masked ones: column, from, method, ...")
    unclassified: list[dict[str, Any]]
    renamed: list[dict[str, Any]]
    dropped: list[dict[str, Any]]


class LineageEntry(Payload):
    """A masking rule that migrated with the schema (derived, renamed, dropped)."""

    column: str
    kind: str
    method: str | None = None
    source: str | None = None
    origin: str
    why: str


class ImageRecord(Payload):
    """How a tier's masked image was last made (app_images.py keeps it as a setting)."""

    branch: str | None = Field(default=None, description="The image: a masked branch of the tier, <tier>-masked-<n>")
    source: str | None = Field(default=None, description="The branch that served the tier when it was made")
    source_snapshot: str | None = Field(default=None, description="Its unmasked read-only source, <image>-src")
    source_xmin: str | None = None
    masking: str | None = Field(default=None, description="Digest of the rules it was masked under")
    as_of: float | None = Field(default=None, description="Unix time of the tier's data it holds")
    seconds: float | None = Field(default=None, description="What the refresh took, end to end")
    mode: Literal["full", "incremental"] | None = Field(default=None, description="How it was last made")
    why: str | None = Field(default=None, description="Why that mode (why not incremental, for a full one)")
    rows_remasked: int | None = Field(default=None, description="Rows re-masked by an incremental refresh")
    mask_s: float | None = Field(default=None, description="Of which masking (or applying the changed rows)")
    freeze_s: float | None = Field(default=None, description="Of which freezing the rewritten pages, so that "
                                   "clones read them without writing")
    migrations_applied: list[str] | None = None
    previous_staleness_s: float | None = Field(default=None, description="How stale the image it replaced was")


class ImageRefreshed(ImageRecord):
    """A tier's masked image made again."""

    tier: str
    image: str
    detail: dict[str, Any] | None = Field(default=None, description="An incremental refresh's diff and writes")


class ImageState(ImageRecord):
    """A tier's masked image: how it was last made (the stored record's fields) and how stale it is."""

    tier: str
    current: bool = Field(description="False when the tier moved or the rules changed since it was made")
    staleness_s: float | None = Field(default=None, description="Age of its data in seconds (None: never made)")
    bytes: int | None = Field(default=None, description="The image's own bytes (what it does not share)")


# -- errors -----------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the envelope is exact: clients switch on it

    code: str = Field(description="The condition, e.g. branch_not_found, policy_denied (the SDK's error class)")
    message: str = Field(description="What happened")
    hint: str = Field(description="What to do")
    data: dict[str, Any] = Field(default_factory=dict)
    exit_code: int = Field(1, description="The CLI's exit code for it: 1 error, 2 refused by a rule")


class ErrorEnvelope(BaseModel):
    """Every error of the API, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody


#: the error answers every operation may give, for the OpenAPI document
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": what}
    for status, what in ((400, "Bad input"), (401, "No or a wrong token"), (403, "Refused by the policy"),
                         (404, "No such branch, route or endpoint"), (405, "No such method on the endpoint"),
                         (408, "A statement ran past its time limit"), (409, "Conflict (exists, busy)"),
                         (413, "The upload is larger than the platform takes"),
                         (422, "The request does not validate"), (500, "An unexpected error, translated"),
                         (501, "Not supported by this platform's provider"),
                         (503, "A compute or the platform is not ready"), (507, "Disk full"))
}
