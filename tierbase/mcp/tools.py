"""The tools an agent gets: each one thin call through the SDK client to the platform's API.

The MCP process holds nothing but the token it was started with: every decision (policy, audit,
quotas, the compute role of SQL) is the platform's. What is local to this process is only what its
operator named when starting it: the migrations directory and the git working copy of the flow.
Each tool says whether it can change anything (``writes``): ``--read-only`` leaves those out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput

if TYPE_CHECKING:
    from ..api.client import Client


@dataclass
class Agent:
    """What every tool works with: the SDK client, who it is, and what the operator configured."""

    client: Client
    me: dict[str, Any]
    migrations_dir: Path | None = None
    repo: Path = field(default_factory=Path.cwd)
    read_only: bool = False

    @property
    def name(self) -> str:
        return str(self.me["name"])

    def files(self, files: dict[str, str] | None) -> dict[str, str]:
        """The migration files: those sent, else the operator's directory (never a path a caller names)."""
        if files is not None:
            return files
        if self.migrations_dir is None:
            raise InvalidInput("no migration files were sent and this MCP server has no migrations directory",
                               "Send `files` (name -> SQL text), or start it with `tierbase mcp --dir DIR`")
        from ..migrate.files import read_dir

        return read_dir(self.migrations_dir)


@dataclass(frozen=True)
class ToolSpec:
    fn: Callable[..., Any]
    writes: bool
    destructive: bool = False

    @property
    def name(self) -> str:
        return self.fn.__name__


TOOLS: list[ToolSpec] = []


def tool(*, writes: bool, destructive: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        TOOLS.append(ToolSpec(fn, writes, destructive))
        return fn

    return register


# -- who and where -------------------------------------------------------------------------
@tool(writes=False)
def whoami(agent: Agent) -> dict[str, Any]:
    """The principal this server acts as: name, role, whether it is read-only, its quotas."""
    return agent.client.whoami()


@tool(writes=False)
def list_branches(agent: Agent, mine: bool = False) -> list[dict[str, Any]]:
    """Every branch (name, parent, kind, state, compute, creator, expiry); mine=true: only those you created."""
    got = agent.client.list_branches(with_bytes=False)
    return [b for b in got if b["creator"] == agent.name] if mine else got


@tool(writes=False)
def describe_branch(agent: Agent, name: str) -> dict[str, Any]:
    """One branch in detail, with its own bytes and live proxy sessions."""
    return agent.client.get_branch(name)


@tool(writes=False)
def list_tiers(agent: Agent) -> dict[str, Any]:
    """The declared tiers, parents first, and the entry tier features fork from by default."""
    shown = agent.client.show_config()
    tiers = {b["name"]: b for b in agent.client.list_branches(with_bytes=False) if b["kind"] == "tier"}
    return {"entry": shown["entry"], "tiers": [{"name": t, **({k: tiers[t][k] for k in (
        "parent", "protected", "compute")} if t in tiers else {})} for t in shown["tiers"]]}


# -- branches --------------------------------------------------------------------------------
@tool(writes=True)
def create_branch(agent: Agent, name: str, parent: str | None = None, ttl: str | None = None) -> dict[str, Any]:
    """Create branch NAME off PARENT (default: the entry tier), copy-on-write in milliseconds; ttl e.g. 2h."""
    return agent.client.create_branch(name, parent, ttl=ttl)


@tool(writes=True, destructive=True)
def reset_branch(agent: Agent, name: str) -> dict[str, Any]:
    """Throw away every change on your branch NAME: it becomes a fresh copy of its parent (same URL)."""
    return agent.client.reset_branch(name)


@tool(writes=True, destructive=True)
def delete_branch(agent: Agent, name: str) -> dict[str, Any]:
    """Delete your branch NAME (and nothing else)."""
    return {"deleted": agent.client.delete_branch(name)}


@tool(writes=False)
def connection_string(agent: Agent, branch: str, database: str = "postgres", pooled: bool = False) -> dict[str, Any]:
    """A postgres:// URL for BRANCH with your own credentials, through the platform's proxy.

    pooled=true: transaction pooling (many short connections share a few server ones; no session state such
    as SET, prepared statements or advisory locks across transactions). The default URL keeps a session.
    """
    return {"branch": branch, "url": agent.client.branch_url(branch, database, pooled=pooled), "pooled": pooled}


# -- SQL and schema --------------------------------------------------------------------------------
@tool(writes=False)
def run_sql(agent: Agent, branch: str, sql: str, params: list[Any] | None = None, database: str | None = None,
            max_rows: int = 100, timeout_s: float = 10.0) -> dict[str, Any]:
    """Run SQL on BRANCH (one transaction) and get the last statement's rows as JSON.

    On your own branches you may write; elsewhere, and in read-only mode, it runs read-only. A
    statement past timeout_s is cancelled on the compute; more than max_rows rows are cut (truncated=true).
    """
    return agent.client.run_sql(branch, sql, params, database=database, max_rows=max_rows, timeout_s=timeout_s,
                                read_only=agent.read_only)


_TABLES = ("SELECT table_schema AS schema, table_name AS name, table_type AS type FROM information_schema.tables "
           "WHERE table_schema NOT IN ('pg_catalog', 'information_schema', 'tierbase_meta') ORDER BY 1, 2")
_COLUMNS = ("SELECT column_name AS name, data_type AS type, is_nullable = 'YES' AS nullable, column_default AS default "
            "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position")
_INDEXES = "SELECT indexname AS name, indexdef AS definition FROM pg_indexes WHERE schemaname = %s AND tablename = %s"


@tool(writes=False)
def describe_schema(agent: Agent, branch: str, table: str | None = None, database: str | None = None) -> dict[str, Any]:
    """The tables of BRANCH, or one table's columns and indexes (table: NAME or SCHEMA.NAME)."""
    def rows(sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        got = agent.client.run_sql(branch, sql, params, database=database, max_rows=10_000, timeout_s=30,
                                   read_only=True)
        return [dict(zip(got["columns"], r, strict=True)) for r in got["rows"]]

    if table is None:
        return {"branch": branch, "tables": rows(_TABLES)}
    schema, _, name = table.rpartition(".")
    columns = rows(_COLUMNS, [schema or "public", name])
    if not columns:
        raise InvalidInput(f"table {table!r} does not exist on {branch!r} (or you cannot see it)",
                           "Call describe_schema without a table to list them")
    return {"branch": branch, "table": table, "columns": columns, "indexes": rows(_INDEXES, [schema or "public", name])}


@tool(writes=False)
def schema_diff(agent: Agent, a: str, b: str | None = None) -> dict[str, Any]:
    """The schema changes from branch A to branch B (default: from A's parent to A)."""
    return agent.client.diff(a, b, "text")


# -- migrations ------------------------------------------------------------------------------------
@tool(writes=True)
def migration_new(agent: Agent, name: str, sql: str, undo_sql: str | None = None) -> dict[str, Any]:
    """Write the next migration file V<n>__NAME.sql (and U<n> with undo_sql) into the project's migrations dir."""
    if agent.migrations_dir is None:
        raise InvalidInput("this MCP server has no migrations directory",
                           "Start it with `tierbase mcp --dir DIR` (or declare [project] migrations in tierbase.toml)")
    from ..migrate.files import new_migration

    paths = new_migration(agent.migrations_dir, name, with_undo=undo_sql is not None)
    paths[0].write_text(sql if sql.endswith("\n") else sql + "\n")
    if undo_sql is not None:
        paths[1].write_text(undo_sql if undo_sql.endswith("\n") else undo_sql + "\n")
    return {"created": [p.name for p in paths]}


@tool(writes=False)
def migration_status(agent: Agent, branch: str, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Which migrations BRANCH has applied and which are pending (files: name -> SQL; default: the project's)."""
    return agent.client.migrate_status(branch, files=agent.files(files))


@tool(writes=False)
def migration_lint(agent: Agent, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Lint the migrations for unsafe changes (locks, rewrites) with squawk."""
    return agent.client.migrate_lint(files=agent.files(files))


@tool(writes=True)
def migration_verify(agent: Agent, parent: str | None = None, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply the migrations on a throwaway branch of PARENT and check re-runs and undo files; nothing is kept."""
    return agent.client.migrate_verify(parent, files=agent.files(files))


@tool(writes=True)
def migration_apply(agent: Agent, branch: str, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply the pending migrations to your branch BRANCH (each file in one transaction)."""
    return agent.client.migrate_apply(branch, files=agent.files(files))


@tool(writes=True, destructive=True)
def promote(agent: Agent, tier: str, source: str | None = None, files: dict[str, str] | None = None) -> dict[str, Any]:
    """Promote the migrations into TIER from its child tier (the platform refuses agents: ask a human)."""
    return agent.client.promote(tier, source, files=agent.files(files))


# -- workflow ---------------------------------------------------------------------------------------
def _workspace(agent: Agent) -> Any:
    from ..workflow.workspace import Workspace

    return Workspace(agent.repo, agent.client)  # type: ignore[arg-type]


@tool(writes=False)
def flow_status(agent: Agent) -> dict[str, Any]:
    """The workflow state of this working copy, the gates of the next transitions and the evidence so far."""
    from ..workflow import doctor

    return dict(doctor.status(_workspace(agent)))


@tool(writes=True)
def flow_claim(agent: Agent, feature: str, parent: str | None = None) -> dict[str, Any]:
    """Claim FEATURE: git branch feature/FEATURE and database branch FEATURE off the tier."""
    from ..workflow import flow

    return flow.claim(_workspace(agent), feature, parent)


@tool(writes=True)
def flow_ready(agent: Agent) -> dict[str, Any]:
    """Gate to pr-ready: commits ahead, clean tree, tests kept, migrations verified by the platform."""
    from ..workflow import checks

    return checks.ready(_workspace(agent))


@tool(writes=True)
def flow_ci(agent: Agent, wait: float = 0.0) -> dict[str, Any]:
    """Ask for a CI run of the prepared commit (a CI runner takes it); wait: seconds to wait for its result."""
    from ..workflow import checks

    return checks.ci(_workspace(agent), wait=wait)


# -- governance -------------------------------------------------------------------------------------
@tool(writes=False)
def audit_mine(agent: Agent, limit: int = 50, action: str | None = None) -> list[dict[str, Any]]:
    """Your own most recent audit records (allowed, refused, errors), newest last."""
    return agent.client.audit_log(actor=agent.name, action=action, limit=max(1, min(limit, 1000)))


@tool(writes=False)
def explain(agent: Agent, action: str, target: str, source: str | None = None) -> dict[str, Any]:
    """Would the policy let you do ACTION (e.g. branch.create, branch.delete, migrate.apply, promote) on TARGET?"""
    return agent.client.explain(agent.name, action, target, source)


# -- sessions ---------------------------------------------------------------------------------------
@tool(writes=True)
def session_start(agent: Agent, branch: str | None = None, parent: str | None = None,
                  ttl: str | None = None) -> dict[str, Any]:
    """Lease a branch of your own for this session (default name <you>-<hex>, off the entry tier, ttl 30m).

    Using it (SQL, connections) renews the lease; the platform reclaims it once idle past its ttl.
    """
    got = agent.client.session_start(branch, parent, ttl)
    got["url"] = agent.client.branch_url(str(got["branch"]))
    return got


@tool(writes=True)
def session_renew(agent: Agent, session_id: str, ttl: str | None = None) -> dict[str, Any]:
    """Push your session's lease end to now + ttl."""
    return agent.client.session_renew(session_id, ttl)


@tool(writes=True, destructive=True)
def session_end(agent: Agent, session_id: str) -> dict[str, Any]:
    """End your session and delete its branch."""
    return agent.client.session_end(session_id)


@tool(writes=False)
def session_list(agent: Agent) -> list[dict[str, Any]]:
    """Your live sessions and when their leases end."""
    return agent.client.session_list()
