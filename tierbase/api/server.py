"""The HTTP API: thin routes over the facade, one JSON error envelope.

Handlers are plain ``def`` so FastAPI runs them in its thread pool: the facade
blocks on subprocesses and SQLite, and must not stall the event loop that the
proxy shares.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..app import Tierbase
from ..errors import TierbaseError, Unauthorized


class BranchCreate(BaseModel):
    name: str = Field(description="1-63 of [a-z0-9-]")
    parent: str | None = None
    ttl: str | None = Field(default=None, description="e.g. 90s, 30m, 12h, 7d")
    snapshot: bool = False
    start: bool = False


class RouteSet(BaseModel):
    branch: str
    drain: float = 0.0


class ImportDump(BaseModel):
    path: str
    branch: str = "production"
    database: str = "postgres"


def create_app(tb: Tierbase, token: str, hooks: Any = None) -> FastAPI:
    """Build the API over ``tb``; ``hooks`` (the service) repoints live proxy sessions."""
    app = FastAPI(title="tierbase", version=__version__,
                  description="Copy-on-write branches of PostgreSQL: branches, computes, routes.")

    def auth(request: Request) -> None:
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong API token",
                               "Send `Authorization: Bearer <token>` (the CLI reads it from the data dir)")

    @app.exception_handler(TierbaseError)
    async def tierbase_error(_: Request, err: TierbaseError) -> JSONResponse:
        return JSONResponse({"error": err.to_dict()}, status_code=err.http_status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = {"code": "invalid_input", "message": f"{where}: {first.get('msg', 'invalid request')}",
                "hint": "See the OpenAPI document at /openapi.json", "data": {}}
        return JSONResponse({"error": body}, status_code=422)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    guarded = [Depends(auth)]

    @app.get("/v1/status", dependencies=guarded)
    def status() -> dict[str, Any]:
        out = tb.status()
        if hooks is not None:
            out.update(hooks.status())
        return out

    @app.get("/v1/branches", dependencies=guarded)
    def list_branches(bytes: bool = True) -> list[dict[str, Any]]:
        return _with_sessions(tb.list_branches(with_bytes=bytes), hooks)

    @app.post("/v1/branches", status_code=201, dependencies=guarded)
    def create_branch(body: BranchCreate) -> dict[str, Any]:
        return tb.create_branch(body.name, body.parent, ttl=body.ttl, snapshot=body.snapshot, start=body.start)

    @app.get("/v1/branches/{name}", dependencies=guarded)
    def show_branch(name: str) -> dict[str, Any]:
        return _with_sessions([tb.get_branch(name)], hooks)[0]

    @app.delete("/v1/branches/{name}", dependencies=guarded)
    def delete_branch(name: str, recursive: bool = False) -> dict[str, Any]:
        return {"deleted": tb.delete_branch(name, recursive=recursive)}

    @app.post("/v1/branches/{name}/reset", dependencies=guarded)
    def reset_branch(name: str) -> dict[str, Any]:
        return tb.reset_branch(name)

    @app.post("/v1/branches/{name}/start", dependencies=guarded)
    def start_branch(name: str) -> dict[str, Any]:
        return tb.start_branch(name)

    @app.post("/v1/branches/{name}/stop", dependencies=guarded)
    def stop_branch(name: str) -> dict[str, Any]:
        return tb.stop_branch(name)

    @app.get("/v1/branches/{name}/url", dependencies=guarded)
    def branch_url(name: str, database: str = "postgres", direct: bool = False) -> dict[str, Any]:
        return {"name": name, "url": tb.branch_url(name, database, direct=direct)}

    @app.get("/v1/routes", dependencies=guarded)
    def routes() -> list[dict[str, Any]]:
        return tb.list_routes()

    @app.put("/v1/routes/{name}", dependencies=guarded)
    def set_route(name: str, body: RouteSet) -> dict[str, Any]:
        if hooks is not None:
            return dict(hooks.repoint(name, body.branch, body.drain))
        return tb.set_route(name, body.branch)

    @app.post("/v1/sweep", dependencies=guarded)
    def sweep() -> dict[str, Any]:
        return {"deleted": tb.sweep()}

    @app.post("/v1/import", dependencies=guarded)
    def import_dump(body: ImportDump) -> dict[str, Any]:
        return tb.import_dump(body.path, body.branch, body.database)

    return app


def _with_sessions(infos: list[dict[str, Any]], hooks: Any) -> list[dict[str, Any]]:
    if hooks is not None:
        for info in infos:
            info["sessions"] = hooks.sessions(info["name"])
    return infos
