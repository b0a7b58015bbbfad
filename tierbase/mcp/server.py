"""`tierbase mcp`: the tools of tools.py served over MCP (stdio, or streamable HTTP on loopback).

A refusal or an error of the platform comes back as a tool error (``isError``) whose text and
structured content carry ``code``, ``message``, ``hint`` and, for a policy refusal, ``rule`` and
``reason``: an agent can read why and what to do, and the server never crashes on it. Tools run in
a worker thread (the SDK client is blocking), so one slow call does not stall the others.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations

from .. import __version__
from ..errors import InvalidInput, TierbaseError, translate
from .tools import TOOLS, Agent, ToolSpec

log = logging.getLogger("tierbase.mcp")

INSTRUCTIONS = (
    "tierbase gives you copy-on-write branches of a real PostgreSQL. Work on a branch of your own: "
    "create_branch (off the entry tier by default) or session_start, then run_sql / migration_apply on it, "
    "schema_diff to see what changed, delete_branch when done. You act as the principal of the token this "
    "server was started with; the platform decides and audits every call. A refused call returns an error "
    "with code, rule and hint: use `explain` to ask the policy before trying."
)


def error_result(err: TierbaseError) -> CallToolResult:
    """A tool error an agent can act on: the platform's envelope, as text and as structured content."""
    body = err.to_dict()
    for key in ("rule", "reason", "action", "target"):  # a policy refusal's fields, on top for the reader
        if key in err.data:
            body[key] = err.data[key]
    text = f"Error ({body['code']}): {err.message}." + (f" {err.hint}." if err.hint else "")
    return CallToolResult(content=[TextContent(type="text", text=text + "\n" + json.dumps({"error": body}))],
                          structured_content={"error": body}, is_error=True)


def _wrap(spec: ToolSpec, agent: Agent) -> Callable[..., Awaitable[Any]]:
    fn = spec.fn

    @functools.wraps(fn)
    async def call(**kwargs: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, agent, **kwargs))
        except TierbaseError as err:
            return error_result(err)
        except Exception as err:  # never a crash: the same envelope, with what to do
            log.exception("tool %s failed", spec.name)
            return error_result(translate(err))

    # the SDK reads the parameters from the signature: the agent is ours, not the caller's
    sig = inspect.signature(fn)
    call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    del call.__wrapped__  # type: ignore[attr-defined]
    return call


def strict_arguments(known: dict[str, set[str]]) -> ServerMiddleware[Any]:
    """Middleware: an argument a tool does not take is an error, not silently dropped (the SDK drops it)."""
    async def check(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method == "tools/call" and isinstance(params, Mapping) and params.get("name") in known:
            args = params.get("arguments") or {}
            taken = known[str(params["name"])]
            unknown = sorted(set(args) - taken) if isinstance(args, Mapping) else []
            if unknown:
                return error_result(InvalidInput(
                    f"tool {params['name']!r} takes no argument {', '.join(map(repr, unknown))}",
                    f"Its arguments are: {', '.join(sorted(taken)) or 'none'}"))
        return await call_next(ctx)

    return check


def build(agent: Agent) -> MCPServer[Any]:
    """The MCP server for ``agent``; in read-only mode only the tools that cannot write exist."""
    specs = [s for s in TOOLS if not (agent.read_only and s.writes)]
    known = {s.name: set(list(inspect.signature(s.fn).parameters)[1:]) for s in specs}
    server: MCPServer[Any] = MCPServer(name="tierbase", version=__version__, instructions=INSTRUCTIONS,
                                       log_level="WARNING", middleware=[strict_arguments(known)])
    for spec in specs:
        server.add_tool(_wrap(spec, agent), name=spec.name, description=(spec.fn.__doc__ or "").strip(),
                        annotations=ToolAnnotations(read_only_hint=not spec.writes,
                                                    destructive_hint=spec.destructive if spec.writes else None))
    return server


class BearerOnly:
    """The HTTP transport answers only a caller holding the token this server acts with.

    Without it, anyone who can reach the port would act as the principal (DNS rebinding from a
    browser included: the SDK's host check stays on too).
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                body = json.dumps({"error": {"code": "unauthorized", "message": "no valid bearer token",
                                             "hint": "Send Authorization: Bearer $TIERBASE_TOKEN"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def serve_stdio(server: MCPServer[Any]) -> None:
    server.run("stdio")


def serve_http(server: MCPServer[Any], token: str, host: str, port: int) -> None:
    import uvicorn

    app = BearerOnly(server.streamable_http_app(streamable_http_path="/mcp", host=host), token)
    print(f"tierbase MCP server on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")).run()
