"""The Python SDK over the HTTP API: the same methods as the facade, remotely."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidInput, NotRunning, TierbaseError, Unauthorized, error_from_dict
from ..home import Home, default_home
from ..settings import from_env

# typing only for the type checker: every CLI call imports this module, and typing costs it milliseconds;
# payload_type() imports it when it reads the annotations
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import IO, Annotated, Any, TypeVar

    import httpx

    from .. import payloads as P

# httpx is imported only by a client that needs it (an https URL, an upload): JSON calls to an http://
# service go through api/wire.py, so a CLI process does not pay for httpx's import.

#: what the SDK hands back: the JSON object as received. Each method's return type names the payload
#: model it follows (``Annotated[JSON, P.Branch]``: tierbase/payloads.py, the API's response_model), so
#: callers keep indexing dicts while the shape is written down once; pydantic is imported only to check
#: (``Client(check=True)``), never by a CLI call.
if TYPE_CHECKING:
    JSON = dict[str, Any]
    _F = TypeVar("_F", bound=Callable[..., Any])


class PayloadDrift(TierbaseError):
    """The service answered with a payload that does not match the SDK's model of it."""

    code = "payload_drift"


@functools.cache
def payload_type(method: Callable[..., Any]) -> Any:
    """The payload model named by ``method``'s return annotation (None when it names none)."""
    import typing

    from .. import payloads

    names = {**globals(), "P": payloads, "JSON": _json_type(), "Annotated": typing.Annotated, "Any": typing.Any}
    hints = typing.get_type_hints(method, names, include_extras=True)
    ret = hints.get("return")
    return getattr(ret, "__metadata__", (None,))[0] if typing.get_origin(ret) is typing.Annotated else None


def _json_type() -> Any:
    from typing import Any

    return dict[str, Any]


def __getattr__(name: str) -> Any:
    if name == "JSON":  # made on first use (it needs typing.Any)
        return _json_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_payload(model: Any, got: Any, what: str) -> None:
    """Raise PayloadDrift when ``got`` does not validate as ``model`` (extra fields are fine)."""
    from pydantic import TypeAdapter, ValidationError

    if model is None:
        return
    try:
        TypeAdapter(model).validate_python(got)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the answer"
        raise PayloadDrift(f"the service's answer to {what} does not match the SDK's {model!r}: {where}: "
                           f"{first['msg']}", "Use an SDK of the service's version (`tierbase --version` on both "
                           "sides)", errors=len(err.errors())) from err


def checked(method: _F) -> _F:
    """Check what ``method`` returns against its payload model when the client was made with check=True."""
    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        got = method(self, *args, **kwargs)
        if self.check:
            check_payload(payload_type(method), got, method.__name__)
        return got
    return call  # type: ignore[return-value]  # the same signature, by functools.wraps

_CHUNK = 1 << 20


def service_info(home: Home) -> dict[str, Any] | None:
    """What the running service wrote about itself (pid, API URL); None when it does not run."""
    try:
        return dict(json.loads(home.service.read_text()))
    except PermissionError as err:
        raise TierbaseError(f"OS user {_os_user(os.geteuid())} cannot read the data dir {home.root}",
                            "It is the service's alone: set TIERBASE_API (or `tierbase --api URL`) to the "
                            "service's URL and TIERBASE_TOKEN to your token") from err
    except (OSError, ValueError):
        return None


def _token_file() -> str | None:
    """~/.config/tierbase/token, where a principal may keep the token it was given."""
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tierbase" / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@contextmanager
def _dump_body(src: Path) -> Iterator[tuple[IO[bytes], int]]:
    """The bytes to upload for ``src`` and their size: a file as it is, a -Fd directory as a script."""
    if src.is_dir():
        import tempfile

        with tempfile.TemporaryFile() as fh:
            from ..provider import directory_script  # pg_restore + psycopg: only for -Fd dumps

            directory_script(src, fh)
            size = os.fstat(fh.fileno()).st_size  # pg_restore wrote through the shared descriptor
            fh.seek(0)
            yield fh, size
        return
    if not src.is_file():
        raise InvalidInput(f"dump file {str(src)!r} does not exist", "Give the path of a pg_dump output")
    with open(src, "rb") as fh:
        yield fh, os.fstat(fh.fileno()).st_size


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(_CHUNK):
        yield chunk


def _os_user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


#: data dirs whose owner this process already said it acts as
_told: set[Path] = set()


def owner_token(home: Home) -> str:
    """The data dir owner's token, for a caller without one who is that OS user (or root).

    The token file belongs to the OS user who first ran ``tierbase up`` (mode 0600): its owner
    is who may act without a token. Anyone else is refused, never silently promoted.
    """
    me = os.geteuid()
    hint = ("Set TIERBASE_TOKEN to your token (a platform engineer makes one with `tierbase principal create`), "
            "and TIERBASE_API (or --api URL) to the service's URL")
    try:
        owner: int | None = home.token.stat().st_uid
    except FileNotFoundError as err:
        raise Unauthorized(f"no TIERBASE_TOKEN is set, and OS user {_os_user(me)} owns no data dir at {home.root} "
                           "(only a data dir's owner acts without a token)", hint) from err
    except PermissionError:
        owner = None  # cannot even look inside: not the owner
    if owner is None or me not in (0, owner):
        raise Unauthorized(f"no TIERBASE_TOKEN is set, and OS user {_os_user(me)} is not the owner of the "
                           f"data dir {home.root} (only its owner acts without a token)", hint)
    try:
        token = home.token.read_text().strip()
    except OSError as err:
        raise Unauthorized(f"no TIERBASE_TOKEN is set, and the owner's token at {home.token} cannot be read "
                           f"({err.strerror})", hint) from err
    if not token:
        raise Unauthorized(f"no TIERBASE_TOKEN is set, and the owner's token file {home.token} is empty", hint)
    if home.root not in _told:
        _told.add(home.root)
        print(f"acting as {_os_user(owner)}, the data dir's owner: no TIERBASE_TOKEN", file=sys.stderr)
    return token


class Client:
    """Talks to the service of one data dir, or to ``url`` (env TIERBASE_API) with ``token``.

    The token is ``token``, else TIERBASE_TOKEN, else ~/.config/tierbase/token; an empty one counts
    as none. Without any, only the data dir's OS owner (or root) acts, as the owner, and is told so.
    ``check``: validate every answer against its payload model (PayloadDrift when it drifted); off by
    default because it imports pydantic.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *, url: str | None = None,
                 token: str | None = None, timeout: float = 600, check: bool = False) -> None:
        self.check = check
        self.home = Home(default_home() if home is None else Path(home))
        url = url or from_env("api") or None
        info = service_info(self.home) if url is None else {"api_url": url.rstrip("/")}
        if info is None:
            raise NotRunning(f"tierbase is not running for the data dir {self.home.root}",
                             "Start it with `tierbase up` (or set TIERBASE_HOME to the right data dir, or "
                             "TIERBASE_API to the service's URL)")
        tok = (token or from_env("token") or "").strip() or _token_file() or owner_token(self.home)
        self.base_url = str(info["api_url"]).rstrip("/")
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {tok}"}
        self._wire = self.base_url.startswith("http://")
        self._httpx: httpx.Client | None = None

    def close(self) -> None:
        if self._httpx is not None:
            self._httpx.close()

    @property
    def _http(self) -> httpx.Client:
        if self._httpx is None:
            import httpx

            # idle connections are dropped before the server's keep-alive timeout (uvicorn: 5 s) can close
            # them under a request just sent (the soak saw "Connection reset by peer" on 0.1 % of calls)
            self._httpx = httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers,
                                       limits=httpx.Limits(keepalive_expiry=2.0))
        return self._httpx

    def _send(self, method: str, path: str, params: dict[str, Any] | None, json_body: Any,
              **kwargs: Any) -> tuple[int, Any, str]:
        """(status, parsed JSON or None, text) of one request, by the light transport when it can serve it."""
        down = ("Check `tierbase status`; restart it with `tierbase up`")
        if self._wire and not kwargs:
            from .wire import WireError, request

            try:
                reply = request(self.base_url, method, path, headers=self._headers, params=params,
                                json_body=json_body, timeout=self._timeout)
            except WireError as err:
                raise NotRunning(f"the tierbase service at {self.base_url} does not answer ({err})", down) from err
            status, text = reply.status, reply.text
        else:
            import httpx

            try:
                resp = self._http.request(method, path, params=params, json=json_body, **kwargs)
            except httpx.TransportError as err:
                raise NotRunning(f"the tierbase service at {self.base_url} does not answer ({err})", down) from err
            status, text = resp.status_code, resp.text
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        return status, body, text

    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
              **kwargs: Any) -> Any:
        status, body, text = self._send(method, path, params, json, **kwargs)
        if status >= 400:
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                raise error_from_dict(body["error"])
            raise TierbaseError(f"the API answered {status}: {text[:300]}", "See the service log")
        return body

    # -- the facade's methods -----------------------------------------------------
    @checked
    def status(self) -> Annotated[JSON, P.Status]:
        return dict(self._call("GET", "/v1/status"))

    @checked
    def space(self) -> Annotated[JSON, P.Space]:
        return dict(self._call("GET", "/v1/space"))

    @checked
    def list_branches(self, *, with_bytes: bool = True) -> Annotated[list[JSON], list[P.Branch]]:
        return list(self._call("GET", "/v1/branches", params={"bytes": with_bytes}))

    @checked
    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None,
                      snapshot: bool = False, start: bool = False, at: str | None = None,
                      lsn: str | None = None, inclusive: bool = True) -> Annotated[JSON, P.Branch]:
        body: dict[str, Any] = {"name": name, "parent": parent, "ttl": ttl, "snapshot": snapshot, "start": start}
        if at is not None or lsn is not None:  # a point in time (app_pitr)
            body.update(at=at, lsn=lsn, inclusive=inclusive)
        return dict(self._call("POST", "/v1/branches", json=body))

    @checked
    def create_ci_branch(self, feature: str, parent: str | None = None, *,
                         ttl: str | None = None) -> Annotated[JSON, P.Branch]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ci-branch", json={"parent": parent, "ttl": ttl}))

    @checked
    def get_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return dict(self._call("GET", f"/v1/branches/{name}"))

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        return list(self._call("DELETE", f"/v1/branches/{name}", params={"recursive": recursive})["deleted"])

    @checked
    def reset_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return dict(self._call("POST", f"/v1/branches/{name}/reset"))

    @checked
    def start_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return dict(self._call("POST", f"/v1/branches/{name}/start"))

    @checked
    def stop_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return dict(self._call("POST", f"/v1/branches/{name}/stop"))

    def branch_url(self, name: str, dbname: str = "postgres", direct: bool = False,
                   sslmode: str | None = None, *, pooled: bool = False) -> str:
        params: dict[str, Any] = {"database": dbname, "direct": direct, **({"pooled": True} if pooled else {})}
        if sslmode:
            params["sslmode"] = sslmode
        got = self._call("GET", f"/v1/branches/{name}/url", params=params)
        return str(got["url"])

    @checked
    def run_sql(self, name: str, sql: str, params: list[Any] | None = None, *, database: str | None = None,
                max_rows: int = 1000, timeout_s: float = 30.0, read_only: bool = False) -> Annotated[JSON, P.SqlResult]:
        body = {"sql": sql, "params": params, "database": database, "max_rows": max_rows, "timeout_s": timeout_s,
                "read_only": read_only}
        return dict(self._call("POST", f"/v1/branches/{name}/sql", json=body))

    @checked
    def session_start(self, branch: str | None = None, parent: str | None = None,
                      ttl: str | None = None) -> Annotated[JSON, P.SessionStarted]:
        return dict(self._call("POST", "/v1/sessions", json={"branch": branch, "parent": parent, "ttl": ttl}))

    @checked
    def session_list(self, *, everyone: bool = False) -> Annotated[list[JSON], list[P.Session]]:
        return list(self._call("GET", "/v1/sessions", params={"all": everyone}))

    @checked
    def session_renew(self, sid: str, ttl: str | None = None) -> Annotated[JSON, P.Session]:
        return dict(self._call("POST", f"/v1/sessions/{sid}/renew", json={"ttl": ttl}))

    @checked
    def session_end(self, sid: str) -> Annotated[JSON, P.SessionEnded]:
        return dict(self._call("DELETE", f"/v1/sessions/{sid}"))

    @checked
    def list_routes(self) -> Annotated[list[JSON], list[P.Route]]:
        return list(self._call("GET", "/v1/routes"))

    @checked
    def set_route(self, name: str, branch: str, drain: float = 0.0) -> Annotated[JSON, P.RouteMoved]:
        return dict(self._call("PUT", f"/v1/routes/{name}", json={"branch": branch, "drain": drain}))

    def sweep(self) -> list[str]:
        return list(self._call("POST", "/v1/sweep")["deleted"])

    @checked
    def import_dump(self, path: str | os.PathLike[str], branch: str = "production",
                    dbname: str = "postgres") -> Annotated[JSON, P.Imported]:
        """Send a pg_dump output of the caller's: its bytes are read here and streamed (the service opens
        no path); a -Fd directory goes as the plain script pg_restore makes of it on this side."""
        params = {"branch": branch, "database": dbname}
        with _dump_body(Path(path)) as (fh, size):
            # a refusal (policy, size) before sending the bytes, rather than after
            self._call("POST", "/v1/import/check", params={**params, "size": size})
            return dict(self._call("POST", "/v1/import", params=params, content=_chunks(fh),
                                   headers={"Content-Type": "application/octet-stream",
                                            "Content-Length": str(size)}))

    # -- governance ---------------------------------------------------------------
    @checked
    def create_principal(self, name: str, role: str) -> Annotated[JSON, P.PrincipalCreated]:
        return dict(self._call("POST", "/v1/principals", json={"name": name, "role": role}))

    @checked
    def list_principals(self) -> Annotated[list[JSON], list[P.Principal]]:
        return list(self._call("GET", "/v1/principals"))

    @checked
    def revoke_principal(self, name: str) -> Annotated[JSON, P.Principal]:
        return dict(self._call("DELETE", f"/v1/principals/{name}"))

    @checked
    def show_config(self) -> Annotated[JSON, P.PolicyShown]:
        return dict(self._call("GET", "/v1/policy"))

    def reload_config(self, path: str | os.PathLike[str], *, dry_run: bool = False) -> Annotated[JSON, P.PolicyApplied]:
        """Read the tierbase.toml here, on the client, and upload its text (the server reads no path)."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise TierbaseError(f"cannot read {path}: {err.strerror}", "Give the path of your tierbase.toml") \
                from err
        return self.apply_config(text, str(Path(path).absolute()), dry_run=dry_run)

    @checked
    def apply_config(self, text: str | None, source: str = "", *,
                     dry_run: bool = False) -> Annotated[JSON, P.PolicyApplied]:
        body = {"text": text, "source": source, "dry_run": dry_run}
        return dict(self._call("POST", "/v1/policy/reload", json=body))

    @checked
    def explain(self, principal: str, action: str, target: str,
                source: str | None = None) -> Annotated[JSON, P.Explanation]:
        params = {"principal": principal, "action": action, "target": target}
        if source:
            params["source"] = source
        return dict(self._call("GET", "/v1/policy/explain", params=params))

    @checked
    def masked_images(self) -> Annotated[list[JSON], list[P.ImageState]]:
        return list(self._call("GET", "/v1/masking/images"))

    @checked
    def refresh_masked_images(self, tier: str | None = None, *,
                              full: bool = False) -> Annotated[list[JSON], list[P.ImageRefreshed]]:
        return list(self._call("POST", "/v1/masking/images/refresh", json={"tier": tier, "full": full}))

    @checked
    def audit_log(self, **filters: Any) -> Annotated[list[JSON], list[P.AuditRecord]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._call("GET", "/v1/audit", params=params))

    @checked
    def audit_verify(self) -> Annotated[JSON, P.AuditVerify]:
        return dict(self._call("GET", "/v1/audit/verify"))

    # -- workflow -------------------------------------------------------------------
    @checked
    def tls_ca(self) -> Annotated[JSON, P.TlsCa]:
        return dict(self._call("GET", "/v1/tls/ca"))

    @checked
    def whoami(self) -> Annotated[JSON, P.WhoAmI]:
        return dict(self._call("GET", "/v1/whoami"))

    @checked
    def flow_history(self, feature: str) -> Annotated[JSON, P.FlowHistory]:
        return dict(self._call("GET", f"/v1/flow/{feature}"))

    # transitions are commands (the platform checks every precondition); there is no event to post
    @checked
    def flow_register(self, workspace: str, bundle: str | None = None) -> Annotated[JSON, P.FlowRegistered]:
        return dict(self._call("POST", f"/v1/flow/workspaces/{workspace}", json={"workspace": workspace,
                                                                                "bundle": bundle}))

    @checked
    def flow_tiers(self) -> Annotated[JSON, P.TierRefs]:
        return dict(self._call("GET", "/v1/flow-tiers"))

    @checked
    def flow_claim(self, workspace: str, feature: str, parent: str | None = None,
                   local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowClaimed]:
        return dict(self._call("POST", f"/v1/flow/{feature}/claim",
                               json={"workspace": workspace, "parent": parent, "local": local or {}}))

    @checked
    def flow_ready(self, feature: str, bundle: str | None,
                   local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowSaid]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ready", json={"bundle": bundle, "local": local or {}}))

    @checked
    def flow_approve_tests(self, feature: str, sha: str) -> Annotated[JSON, P.ApprovedTests]:
        return dict(self._call("POST", f"/v1/flow/{feature}/approve-tests", json={"sha": sha}))

    @checked
    def flow_ci(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.CiRun]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ci", json={"local": local or {}}))

    @checked
    def flow_ci_run(self, run: int) -> Annotated[JSON, P.CiRun]:
        return dict(self._call("GET", f"/v1/ci/runs/{run}"))

    @checked
    def flow_ci_runs(self, feature: str) -> Annotated[list[JSON], list[P.CiRun]]:
        return list(self._call("GET", f"/v1/flow/{feature}/ci"))

    @checked
    def ci_take(self) -> Annotated[JSON | None, P.CiTask | None]:
        got = self._call("POST", "/v1/ci/take")["run"]
        return dict(got) if got else None

    @checked
    def ci_report(self, run: int, junit: str | None, output: str, exit_code: int,
                  duration_s: float) -> Annotated[JSON, P.CiRun]:
        return dict(self._call("POST", f"/v1/ci/runs/{run}/report", json={
            "junit": junit, "output": output, "exit_code": exit_code, "duration_s": duration_s}))

    @checked
    def flow_merge(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowMerged]:
        return dict(self._call("POST", f"/v1/flow/{feature}/merge", json={"local": local or {}}))

    @checked
    def flow_abandon(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowAbandoned]:
        return dict(self._call("POST", f"/v1/flow/{feature}/abandon", json={"local": local or {}}))

    @checked
    def tdd_command(self, feature: str, verb: str, **args: Any) -> Annotated[JSON, P.TddDone]:
        return dict(self._call("POST", f"/v1/flow/{feature}/tdd/{verb}", json=args or None))

    # -- migrations and promotion -------------------------------------------------------
    def _migration_files(self, migrations_dir: str | os.PathLike[str] | None) -> dict[str, str]:
        """The migration files, read on this side: the API takes contents, never a directory."""
        from ..migrate.files import read_dir

        return read_dir(Path(migrations_dir) if migrations_dir else self._default_migrations_dir())

    def _default_migrations_dir(self) -> Path:
        """[project] migrations of the tierbase.toml the platform loaded (relative to it), else of ./tierbase.toml."""
        import tomllib

        shown = self.show_config()
        for source, text in ((shown.get("source"), shown.get("text")), ("tierbase.toml", None)):
            if not source:
                continue
            try:
                cfg = tomllib.loads(text) if text else tomllib.loads(Path(source).read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
            rel = cfg.get("project", {}).get("migrations")
            if rel:
                return Path(source).absolute().parent / str(rel)
        raise InvalidInput("no migrations directory is known",
                           "Pass --dir, or declare `[project] migrations = \"db/migrations\"` in tierbase.toml")

    @checked
    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None, *,
                       files: dict[str, str] | None = None) -> Annotated[JSON, P.MigrationStatus]:
        body = {"branch": branch, "files": files if files is not None else self._migration_files(migrations_dir)}
        return dict(self._call("POST", "/v1/migrations/status", json=body))

    @checked
    def migrate_apply(self, branch: str, migrations_dir: str | None = None, *,
                      files: dict[str, str] | None = None) -> Annotated[JSON, P.MigrationsApplied]:
        body = {"branch": branch, "files": files if files is not None else self._migration_files(migrations_dir)}
        return dict(self._call("POST", "/v1/migrations/apply", json=body))

    @checked
    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None, *,
                       files: dict[str, str] | None = None) -> Annotated[JSON, P.VerifyReport]:
        body = {"branch": parent, "files": files if files is not None else self._migration_files(migrations_dir)}
        return dict(self._call("POST", "/v1/migrations/verify", json=body))

    @checked
    def migrate_lint(self, migrations_dir: str | None = None, *,
                     files: dict[str, str] | None = None) -> Annotated[JSON, P.LintReport]:
        sent = files if files is not None else self._migration_files(migrations_dir)
        return dict(self._call("POST", "/v1/migrations/lint", json={"files": sent}))

    @checked
    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None, *,
                files: dict[str, str] | None = None, rehearse: bool = False) -> Annotated[JSON, P.Promotion]:
        body = {"source": source, "files": files if files is not None else self._migration_files(migrations_dir),
                "rehearse": rehearse}
        return dict(self._call("POST", f"/v1/tiers/{tier}/promote", json=body))

    @checked
    def rollback(self, tier: str, to: str | None = None, *, discard_writes: bool = False, yes: bool = False,
                 dry_run: bool = False) -> Annotated[JSON, P.RollbackResult]:
        body = {"to": to, "discard_writes": discard_writes, "yes": yes, "dry_run": dry_run}
        return dict(self._call("POST", f"/v1/tiers/{tier}/rollback", json=body))

    @checked
    def rollbacks(self, tier: str | None = None) -> Annotated[list[JSON], list[P.RollbackSummary]]:
        return list(self._call("GET", "/v1/rollbacks", params={"tier": tier} if tier else {}))

    @checked
    def restore(self, tier: str, *, at: str | None = None, lsn: str | None = None,
                inclusive: bool = True) -> Annotated[JSON, P.Restored]:
        return dict(self._call("POST", f"/v1/tiers/{tier}/restore",
                               json={"at": at, "lsn": lsn, "inclusive": inclusive}))

    @checked
    def history(self, tier: str, *, with_bytes: bool = True) -> Annotated[JSON, P.TierHistory]:
        return dict(self._call("GET", f"/v1/tiers/{tier}/history", params={"bytes": with_bytes}))

    @checked
    def promotions(self, tier: str | None = None) -> Annotated[list[JSON], list[P.Promotion]]:
        return list(self._call("GET", "/v1/promotions", params={"tier": tier} if tier else {}))

    @checked
    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> Annotated[JSON, P.SchemaDiff]:
        params = {"a": a, "format": fmt, **({"b": b} if b else {})}
        return dict(self._call("GET", "/v1/diff", params=params))

    @checked
    def data_diff(self, a: str, b: str, tables: list[str] | None = None,
                  fmt: str = "text") -> Annotated[JSON, P.DataDiff]:
        params: dict[str, Any] = {"a": a, "b": b, "format": fmt, **({"table": tables} if tables else {})}
        return dict(self._call("GET", "/v1/diff/data", params=params))

    def audit_url(self) -> str:
        return str(self._call("GET", "/v1/audit/url")["url"])
