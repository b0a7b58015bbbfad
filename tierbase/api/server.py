"""The HTTP API: thin routes over the facade, one JSON error envelope.

Handlers are plain ``def`` so FastAPI runs them in its thread pool: the facade
blocks on subprocesses and SQLite, and must not stall the event loop that the
proxy shares.
"""

import logging
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..app import Tierbase
from ..app_import import too_large
from ..errors import InvalidInput, TierbaseError, Unauthorized, translate
from ..payloads import (
    ERRORS,
    ApprovedTests,
    AuditRecord,
    AuditVerify,
    Branch,
    BranchUrl,
    CiRun,
    CiTaken,
    DataDiff,
    Deleted,
    Explanation,
    FlowAbandoned,
    FlowClaimed,
    FlowHistory,
    FlowMerged,
    FlowRegistered,
    FlowSaid,
    Health,
    ImageRefreshed,
    ImageState,
    ImportCheck,
    Imported,
    LintReport,
    MigrationsApplied,
    MigrationStatus,
    PolicyApplied,
    PolicyShown,
    Principal,
    PrincipalCreated,
    Promotion,
    Restored,
    RollbackResult,
    RollbackSummary,
    Route,
    RouteMoved,
    SchemaDiff,
    Session,
    SessionEnded,
    SessionStarted,
    Space,
    SqlResult,
    Status,
    TddDone,
    TierHistory,
    TierRefs,
    TlsCa,
    Url,
    VerifyReport,
    WhoAmI,
)
from .upload import drain, require_octets, spool

log = logging.getLogger("tierbase.api")


def typed(model: Any) -> dict[str, Any]:
    """A route's answer: checked against ``model`` (tierbase/payloads.py) and described in the OpenAPI
    document; fields the facade did not set stay out, so typing an answer changes none of it."""
    return {"response_model": model, "response_model_exclude_unset": True}


class BranchCreate(BaseModel):
    name: str = Field(description="1-63 of [a-z0-9-]")
    parent: str | None = None
    ttl: str | None = Field(default=None, description="e.g. 90s, 30m, 12h, 7d")
    snapshot: bool = False
    start: bool = False
    at: str | None = Field(default=None, description="a past time: ISO 8601 with a zone, or -5m")
    lsn: str | None = Field(default=None, description="a past WAL position, e.g. 0/1A2B3C4")
    inclusive: bool = Field(default=True, description="a commit exactly at the target is on the branch")


class ImageRefresh(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: str | None = Field(default=None, description="The tier whose masked image to re-make (default: every one)")
    full: bool = Field(default=False, description="Mask the tier's data whole, even when only rows changed")


class RouteSet(BaseModel):
    branch: str
    drain: float = 0.0


class PrincipalCreate(BaseModel):
    name: str
    role: str


class Local(BaseModel):
    """What a client reports of its working copy: the platform uses it only to refuse."""
    model_config = ConfigDict(extra="forbid")
    git_branch: str | None = None
    dirty: list[str] = Field(default_factory=list, max_length=10_000)
    head: str | None = Field(default=None, max_length=64)
    delete_git_branch: bool = False


class FlowRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workspace: str
    bundle: str | None = Field(default=None, max_length=90_000_000, description="base64 git bundle of the tiers")


class FlowClaim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workspace: str
    parent: str | None = None
    local: Local = Local()


class FlowReady(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str | None = Field(default=None, max_length=90_000_000, description="base64 git bundle of the branch")
    local: Local = Local()


class FlowLocal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    local: Local = Local()


class ApproveTests(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha: str = Field(pattern="^[0-9a-f]{40}$")


class CiReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    junit: str | None = Field(default=None, max_length=50_000_000)
    output: str = Field(default="", max_length=10_000_000)
    exit_code: int
    duration_s: float = Field(ge=0)


class TddAssign(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    principal: str


class TddSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


class TddApprove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    fingerprints: dict[str, str | None] = {}
    items: list[str] = []


class TddRed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str
    test: str
    fingerprint: str


class TddGreen(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[str]
    sha: str | None = None
    passed: int = Field(ge=0)


class MigrationFiles(BaseModel):
    """The migrations directory's .sql files as sent by the client, which read them on its side."""

    model_config = ConfigDict(extra="forbid")
    files: dict[str, str] | None = Field(
        default=None, description="file name -> content of each V<n>__name.sql / U<n>__name.sql file; "
                                  "the server computes the checksums from the contents")

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dir" in data:
            raise ValueError("the server reads no directory it is sent: send the migration files' contents "
                             "as `files` (name -> text); the CLI and the SDK read --dir on your side")
        return data

    def migrations(self) -> dict[str, str]:
        if self.files is None:
            raise InvalidInput("no migration files were sent",
                               "Send the .sql files of the migrations directory as `files` (name -> content); "
                               "`tierbase migrate ... --dir DIR` and the SDK read the directory for you")
        return self.files


class MigrateBody(MigrationFiles):
    branch: str | None = None


class PromoteBody(MigrationFiles):
    source: str | None = None
    rehearse: bool = Field(default=False, description="rehearse on an O(1) branch under a write load first")


class RollbackBody(BaseModel):
    to: str | None = None
    discard_writes: bool = Field(default=False, description="do not replay the writes made since (loudly)")
    yes: bool = Field(default=False, description="confirm a rollback past several promotions or a rolled-back tier")
    dry_run: bool = Field(default=False, description="show what the rollback would undo; change nothing")


class RestoreBody(BaseModel):
    at: str | None = Field(default=None, description="a past time: ISO 8601 with a zone, or -5m")
    lsn: str | None = None
    inclusive: bool = True


class ConfigReload(BaseModel):
    # the server reads no path a request names: the client uploads the file's text
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(default=None, max_length=1_000_000, description="the tierbase.toml to load")
    source: str = Field(default="", max_length=4096, description="where the client read it (a label)")
    dry_run: bool = Field(default=False, description="validate and show the diff; change nothing")


class SqlBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str = Field(max_length=1_000_000, description="one or more statements, run in one transaction")
    params: list[Any] | None = Field(default=None, max_length=1000, description="%s parameters (one statement)")
    database: str | None = Field(default=None, max_length=63, description="default: the project database")
    max_rows: int = Field(default=1000, ge=1, le=10_000, description="rows returned at most; more are cut")
    timeout_s: float = Field(default=30.0, gt=0, le=300, description="per statement and for the whole call")
    read_only: bool = Field(default=False, description="run as tb_reader even where the caller could write")


class SessionStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    branch: str | None = Field(default=None, description="the leased branch's name (default: <principal>-<hex>)")
    parent: str | None = Field(default=None, description="default: the entry tier")
    ttl: str | None = Field(default=None, description="lease, renewed by activity; e.g. 30m (default), 2h")


class SessionRenew(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl: str | None = None


class CiBranch(BaseModel):
    parent: str | None = None
    ttl: str | None = None


def create_app(tb: Tierbase, hooks: Any = None) -> FastAPI:
    """Build the API over ``tb``; ``hooks`` (the service) repoints live proxy sessions."""
    app = FastAPI(title="tierbase", version=__version__, responses=ERRORS,  # one error envelope, documented
                  description="Copy-on-write branches of PostgreSQL: branches, computes, routes, governance.")

    def auth(request: Request) -> Tierbase:
        """The facade acting as the principal whose bearer token came with the request."""
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        try:
            who = tb.gate.principals.authenticate(token)
        except Unauthorized as err:
            # folded per client address and minute: a flood of bad tokens cannot grow the trail without bound
            source = request.client.host if request.client else "unknown"
            tb.gate.audit.note_failure(source, "anonymous", "auth", err.message)
            raise
        return tb.as_principal(who.name, token=token)

    As = Annotated[Tierbase, Depends(auth)]

    @app.exception_handler(TierbaseError)
    async def tierbase_error(_: Request, err: TierbaseError) -> JSONResponse:
        return JSONResponse({"error": err.to_dict()}, status_code=err.http_status)

    @app.exception_handler(Exception)
    async def other_error(_: Request, err: Exception) -> JSONResponse:
        # psycopg or OS errors that escaped the facade: the same envelope, with what to do
        log.exception("API: unexpected error")
        ours = translate(err)
        return JSONResponse({"error": ours.to_dict()}, status_code=ours.http_status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = {"code": "invalid_input", "message": f"{where}: {first.get('msg', 'invalid request')}",
                "hint": "See the OpenAPI document at /openapi.json", "data": {}, "exit_code": 1}
        return JSONResponse({"error": body}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def no_such_endpoint(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # an unknown path or method (a name holding "/", a client of another version): the same envelope
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        body = {"code": code, "message": f"no API endpoint {request.method} {request.url.path} ({err.detail})",
                "hint": "Check the names in the command (one path segment each) and the URL of the service; "
                        "the endpoints are listed at /openapi.json", "data": {}, "exit_code": 1}
        return JSONResponse({"error": body}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.get("/v1/health", **typed(Health))
    def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    @app.get("/v1/status", **typed(Status))
    def status(me: As) -> dict[str, Any]:
        out = me.status()
        if hooks is not None:
            out.update(hooks.status())
        return out

    @app.get("/v1/space", **typed(Space))
    def space(me: As) -> dict[str, Any]:
        return me.space()

    @app.get("/v1/branches", **typed(list[Branch]))
    def list_branches(me: As, bytes: bool = True) -> list[dict[str, Any]]:
        return _with_sessions(me.list_branches(with_bytes=bytes), hooks)

    @app.post("/v1/branches", status_code=201, **typed(Branch))
    def create_branch(me: As, body: BranchCreate) -> dict[str, Any]:
        return me.create_branch(body.name, body.parent, ttl=body.ttl, snapshot=body.snapshot, start=body.start,
                                at=body.at, lsn=body.lsn, inclusive=body.inclusive)

    @app.post("/v1/flow/{feature}/ci-branch", status_code=201, **typed(Branch))
    def create_ci_branch(me: As, feature: str, body: CiBranch) -> dict[str, Any]:
        return me.create_ci_branch(feature, body.parent, ttl=body.ttl)

    @app.get("/v1/branches/{name}", **typed(Branch))
    def show_branch(me: As, name: str) -> dict[str, Any]:
        return _with_sessions([me.get_branch(name)], hooks)[0]

    @app.delete("/v1/branches/{name}", **typed(Deleted))
    def delete_branch(me: As, name: str, recursive: bool = False) -> dict[str, Any]:
        return {"deleted": me.delete_branch(name, recursive=recursive)}

    @app.post("/v1/branches/{name}/reset", **typed(Branch))
    def reset_branch(me: As, name: str) -> dict[str, Any]:
        return me.reset_branch(name)

    @app.post("/v1/branches/{name}/start", **typed(Branch))
    def start_branch(me: As, name: str) -> dict[str, Any]:
        return me.start_branch(name)

    @app.post("/v1/branches/{name}/stop", **typed(Branch))
    def stop_branch(me: As, name: str) -> dict[str, Any]:
        return me.stop_branch(name)

    @app.get("/v1/branches/{name}/url", **typed(BranchUrl))
    def branch_url(me: As, name: str, database: str = "postgres", direct: bool = False,
                   sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] | None = None,
                   pooled: bool = False) -> dict[str, Any]:
        return {"name": name, "url": me.branch_url(name, database, direct=direct, sslmode=sslmode, pooled=pooled)}

    @app.post("/v1/branches/{name}/sql", **typed(SqlResult))
    def run_sql(me: As, name: str, body: SqlBody) -> dict[str, Any]:
        """Rows as JSON, run as the caller's compute role (tb_owner on its branches, else tb_reader)."""
        return me.run_sql(name, body.sql, body.params, database=body.database, max_rows=body.max_rows,
                          timeout_s=body.timeout_s, read_only=body.read_only)

    @app.post("/v1/sessions", status_code=201, **typed(SessionStarted))
    def session_start(me: As, body: SessionStart) -> dict[str, Any]:
        return me.session_start(body.branch, body.parent, body.ttl)

    @app.get("/v1/sessions", **typed(list[Session]))
    def session_list(me: As, all: bool = False) -> list[dict[str, Any]]:
        return me.session_list(everyone=all)

    @app.post("/v1/sessions/{sid}/renew", **typed(Session))
    def session_renew(me: As, sid: str, body: SessionRenew) -> dict[str, Any]:
        return me.session_renew(sid, body.ttl)

    @app.delete("/v1/sessions/{sid}", **typed(SessionEnded))
    def session_end(me: As, sid: str) -> dict[str, Any]:
        return me.session_end(sid)

    @app.get("/v1/routes", **typed(list[Route]))
    def routes(me: As) -> list[dict[str, Any]]:
        return me.list_routes()

    @app.put("/v1/routes/{name}", **typed(RouteMoved))
    def set_route(me: As, name: str, body: RouteSet) -> dict[str, Any]:
        if hooks is not None:
            return dict(hooks.repoint(me, name, body.branch, body.drain))
        return me.set_route(name, body.branch)

    @app.post("/v1/sweep", **typed(Deleted))
    def sweep(me: As) -> dict[str, Any]:
        return {"deleted": me.sweep()}

    @app.post("/v1/import/check", **typed(ImportCheck))
    def import_check(me: As, branch: str = "production", database: str = "postgres",
                     size: int = 0) -> dict[str, Any]:
        """Before uploading: may I import into this branch, and does a dump of ``size`` bytes fit?"""
        limit = me.import_check(branch, database)
        if size > limit:
            raise too_large(limit)
        return {"branch": branch, "database": database, "limit": limit}

    @app.post("/v1/import", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}, **typed(Imported))
    async def import_dump(request: Request, me: As, branch: str = "production",
                          database: str = "postgres") -> dict[str, Any]:
        """The body is the dump itself (plain SQL, pg_dump -Fc or -Ft), streamed; never a path."""
        body = request.stream()  # one iterator: a refusal part-way drains the rest of it
        try:
            require_octets(request)
            limit = await run_in_threadpool(me.import_check, branch, database)
            upload = await run_in_threadpool(me.new_upload)
        except TierbaseError:
            await drain(body)
            raise
        try:
            try:
                await spool(request, body, upload, limit)
            except TierbaseError:
                await drain(body)
                raise
            return dict(await run_in_threadpool(me.import_upload, upload, branch, database))
        finally:
            upload.unlink(missing_ok=True)

    # -- governance ---------------------------------------------------------------------
    @app.get("/v1/principals", **typed(list[Principal]))
    def principals(me: As) -> list[dict[str, Any]]:
        return me.list_principals()

    @app.post("/v1/principals", status_code=201, **typed(PrincipalCreated))
    def create_principal(me: As, body: PrincipalCreate) -> dict[str, Any]:
        return me.create_principal(body.name, body.role)

    @app.delete("/v1/principals/{name}", **typed(Principal))
    def revoke_principal(me: As, name: str) -> dict[str, Any]:
        return me.revoke_principal(name)

    @app.get("/v1/policy", **typed(PolicyShown))
    def show_policy(me: As) -> dict[str, Any]:
        return me.show_config()

    @app.post("/v1/policy/reload", **typed(PolicyApplied))
    def reload_policy(me: As, body: ConfigReload) -> dict[str, Any]:
        return me.apply_config(body.text, body.source, dry_run=body.dry_run)

    @app.get("/v1/policy/explain", **typed(Explanation))
    def explain(me: As, principal: str, action: str, target: str, source: str | None = None) -> dict[str, Any]:
        return me.explain(principal, action, target, source)

    @app.get("/v1/masking/images", **typed(list[ImageState]))
    def masked_images(me: As) -> list[dict[str, Any]]:
        return me.masked_images()

    @app.post("/v1/masking/images/refresh", **typed(list[ImageRefreshed]))
    def refresh_masked_images(me: As, body: ImageRefresh) -> list[dict[str, Any]]:
        return me.refresh_masked_images(body.tier, full=body.full)

    @app.get("/v1/audit", **typed(list[AuditRecord]))
    def audit_log(me: As, actor: str | None = None, action: str | None = None, target: str | None = None,
                  denied: bool | None = None, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return me.audit_log(actor=actor, action=action, target=target, denied=denied, since=since, limit=limit)

    @app.get("/v1/audit/verify", **typed(AuditVerify))
    def audit_verify(me: As) -> dict[str, Any]:
        return me.audit_verify()

    @app.get("/v1/audit/url", **typed(Url))
    def audit_url(me: As) -> dict[str, Any]:
        return {"url": me.audit_url()}

    @app.get("/v1/tls/ca", **typed(TlsCa))
    def tls_ca(me: As) -> dict[str, Any]:
        return me.tls_ca()

    @app.get("/v1/whoami", **typed(WhoAmI))
    def whoami(me: As) -> dict[str, Any]:
        return me.whoami()

    # -- workflow history -------------------------------------------------------------------
    @app.get("/v1/flow/{feature}", **typed(FlowHistory))
    def flow_history(me: As, feature: str) -> dict[str, Any]:
        return me.flow_history(feature)

    # transitions are commands: the platform checks every precondition; no route takes an event
    @app.post("/v1/flow/workspaces/{workspace}", **typed(FlowRegistered))
    def flow_register(me: As, workspace: str, body: FlowRegister) -> dict[str, Any]:
        return me.flow_register(workspace, body.bundle)

    @app.get("/v1/flow-tiers", **typed(TierRefs))
    def flow_tiers(me: As) -> dict[str, Any]:
        return me.flow_tiers()

    @app.post("/v1/flow/{feature}/claim", **typed(FlowClaimed))
    def flow_claim(me: As, feature: str, body: FlowClaim) -> dict[str, Any]:
        return me.flow_claim(body.workspace, feature, body.parent, body.local.model_dump(exclude_unset=True))

    @app.post("/v1/flow/{feature}/ready", **typed(FlowSaid))
    def flow_ready(me: As, feature: str, body: FlowReady) -> dict[str, Any]:
        return me.flow_ready(feature, body.bundle, body.local.model_dump(exclude_unset=True))

    @app.post("/v1/flow/{feature}/approve-tests", **typed(ApprovedTests))
    def flow_approve_tests(me: As, feature: str, body: ApproveTests) -> dict[str, Any]:
        return me.flow_approve_tests(feature, body.sha)

    @app.post("/v1/flow/{feature}/ci", **typed(CiRun))
    def flow_ci(me: As, feature: str, body: FlowLocal) -> dict[str, Any]:
        return me.flow_ci(feature, body.local.model_dump(exclude_unset=True))

    @app.get("/v1/flow/{feature}/ci", **typed(list[CiRun]))
    def flow_ci_runs(me: As, feature: str) -> list[dict[str, Any]]:
        return me.flow_ci_runs(feature)

    @app.get("/v1/ci/runs/{run}", **typed(CiRun))
    def flow_ci_run(me: As, run: int) -> dict[str, Any]:
        return me.flow_ci_run(run)

    @app.post("/v1/ci/take", **typed(CiTaken))
    def ci_take(me: As) -> dict[str, Any]:
        return {"run": me.ci_take()}

    @app.post("/v1/ci/runs/{run}/report", **typed(CiRun))
    def ci_report(me: As, run: int, body: CiReport) -> dict[str, Any]:
        return me.ci_report(run, body.junit, body.output, body.exit_code, body.duration_s)

    @app.post("/v1/flow/{feature}/merge", **typed(FlowMerged))
    def flow_merge(me: As, feature: str, body: FlowLocal) -> dict[str, Any]:
        return me.flow_merge(feature, body.local.model_dump(exclude_unset=True))

    @app.post("/v1/flow/{feature}/abandon", **typed(FlowAbandoned))
    def flow_abandon(me: As, feature: str, body: FlowLocal) -> dict[str, Any]:
        return me.flow_abandon(feature, body.local.model_dump(exclude_unset=True))

    @app.post("/v1/flow/{feature}/tdd/enable", **typed(TddDone))
    def tdd_enable(me: As, feature: str) -> dict[str, Any]:
        return me.tdd_command(feature, "enable")

    @app.post("/v1/flow/{feature}/tdd/assign", **typed(TddDone))
    def tdd_assign(me: As, feature: str, body: TddAssign) -> dict[str, Any]:
        return me.tdd_command(feature, "assign", **body.model_dump())

    @app.post("/v1/flow/{feature}/tdd/submit", **typed(TddDone))
    def tdd_submit(me: As, feature: str, body: TddSubmit) -> dict[str, Any]:
        return me.tdd_command(feature, "submit", **body.model_dump())

    @app.post("/v1/flow/{feature}/tdd/approve", **typed(TddDone))
    def tdd_approve(me: As, feature: str, body: TddApprove) -> dict[str, Any]:
        return me.tdd_command(feature, "approve", **body.model_dump())

    @app.post("/v1/flow/{feature}/tdd/red", **typed(TddDone))
    def tdd_red(me: As, feature: str, body: TddRed) -> dict[str, Any]:
        return me.tdd_command(feature, "red", **body.model_dump())

    @app.post("/v1/flow/{feature}/tdd/green", **typed(TddDone))
    def tdd_green(me: As, feature: str, body: TddGreen) -> dict[str, Any]:
        return me.tdd_command(feature, "green", **body.model_dump())

    # -- migrations, promotion, diff ----------------------------------------------------------
    @app.post("/v1/migrations/status", **typed(MigrationStatus))
    def migrate_status(me: As, body: MigrateBody) -> dict[str, Any]:
        return me.migrate_status(body.branch, files=body.migrations())

    @app.post("/v1/migrations/apply", **typed(MigrationsApplied))
    def migrate_apply(me: As, body: MigrateBody) -> dict[str, Any]:
        if not body.branch:
            raise InvalidInput("no branch to migrate was given", "Pass the branch: --branch NAME")
        return me.migrate_apply(body.branch, files=body.migrations())

    @app.post("/v1/migrations/verify", **typed(VerifyReport))
    def migrate_verify(me: As, body: MigrateBody) -> dict[str, Any]:
        return me.migrate_verify(body.branch, files=body.migrations())

    @app.post("/v1/migrations/lint", **typed(LintReport))
    def migrate_lint(me: As, body: MigrationFiles) -> dict[str, Any]:
        return me.migrate_lint(files=body.migrations())

    @app.post("/v1/tiers/{tier}/promote", **typed(Promotion))
    def promote(me: As, tier: str, body: PromoteBody) -> dict[str, Any]:
        return me.promote(tier, body.source, files=body.migrations(), rehearse=body.rehearse)

    @app.post("/v1/tiers/{tier}/rollback", **typed(RollbackResult))
    def rollback(me: As, tier: str, body: RollbackBody) -> dict[str, Any]:
        return me.rollback(tier, body.to, discard_writes=body.discard_writes, yes=body.yes, dry_run=body.dry_run)

    @app.get("/v1/rollbacks", **typed(list[RollbackSummary]))
    def rollbacks(me: As, tier: str | None = None) -> list[dict[str, Any]]:
        return me.rollbacks(tier)

    @app.post("/v1/tiers/{tier}/restore", **typed(Restored))
    def restore(me: As, tier: str, body: RestoreBody) -> dict[str, Any]:
        return me.restore(tier, at=body.at, lsn=body.lsn, inclusive=body.inclusive)

    @app.get("/v1/tiers/{tier}/history", **typed(TierHistory))
    def history(me: As, tier: str, bytes: bool = True) -> dict[str, Any]:
        return me.history(tier, with_bytes=bytes)

    @app.get("/v1/promotions", **typed(list[Promotion]))
    def promotions(me: As, tier: str | None = None) -> list[dict[str, Any]]:
        return me.promotions(tier)

    @app.get("/v1/diff", **typed(SchemaDiff))
    def diff(me: As, a: str, b: str | None = None, format: str = "text") -> dict[str, Any]:
        return me.diff(a, b, format)

    @app.get("/v1/diff/data", **typed(DataDiff))
    def data_diff(me: As, a: str, b: str, format: str = "text",
                  table: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
        return me.data_diff(a, b, table=table, fmt=format)

    return app


def _with_sessions(infos: list[dict[str, Any]], hooks: Any) -> list[dict[str, Any]]:
    if hooks is not None:
        for info in infos:
            info["sessions"] = hooks.sessions(info["name"])
    return infos
