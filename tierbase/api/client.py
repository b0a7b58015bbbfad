"""The Python SDK over the HTTP API: the same methods as the facade, remotely."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from ..errors import NotRunning, TierbaseError, error_from_dict
from ..home import Home, default_home


def service_info(home: Home) -> dict[str, Any] | None:
    try:
        return dict(json.loads(home.service.read_text()))
    except (OSError, ValueError):
        return None


def _token_file() -> str | None:
    """~/.config/tierbase/token, where a principal may keep the token it was given."""
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tierbase" / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Client:
    """Talks to the service of one data dir (or to ``url`` with ``token``)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, url: str | None = None,
                 token: str | None = None, timeout: float = 600) -> None:
        self.home = Home(default_home() if home is None else Path(home))
        info = service_info(self.home) if url is None else {"api_url": url}
        if info is None:
            raise NotRunning(f"tierbase is not running for the data dir {self.home.root}",
                             "Start it with `tierbase up` (or set TIERBASE_HOME to the right data dir)")
        tok = token or os.environ.get("TIERBASE_TOKEN") or _token_file()
        if tok is None:
            try:
                tok = self.home.token.read_text().strip()
            except OSError as err:
                raise TierbaseError(f"cannot read the API token at {self.home.token}",
                                    "Set TIERBASE_TOKEN, or run as the user who ran `tierbase up`") from err
        self._http = httpx.Client(base_url=str(info["api_url"]), timeout=timeout,
                                  headers={"Authorization": f"Bearer {tok}"})

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise NotRunning(f"the tierbase service at {self._http.base_url} does not answer ({err})",
                             "Check `tierbase status`; restart it with `tierbase up`") from err
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                raise error_from_dict(body["error"])
            raise TierbaseError(f"the API answered {resp.status_code}: {resp.text[:300]}", "See the service log")
        return body

    # -- the facade's methods -----------------------------------------------------
    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/status"))

    def list_branches(self, *, with_bytes: bool = True) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/branches", params={"bytes": with_bytes}))

    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None,
                      snapshot: bool = False, start: bool = False) -> dict[str, Any]:
        body = {"name": name, "parent": parent, "ttl": ttl, "snapshot": snapshot, "start": start}
        return dict(self._call("POST", "/v1/branches", json=body))

    def create_ci_branch(self, feature: str, parent: str | None = None, *, ttl: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ci-branch", json={"parent": parent, "ttl": ttl}))

    def get_branch(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/branches/{name}"))

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        return list(self._call("DELETE", f"/v1/branches/{name}", params={"recursive": recursive})["deleted"])

    def reset_branch(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/branches/{name}/reset"))

    def start_branch(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/branches/{name}/start"))

    def stop_branch(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/branches/{name}/stop"))

    def branch_url(self, name: str, dbname: str = "postgres", direct: bool = False,
                   sslmode: str | None = None) -> str:
        params: dict[str, Any] = {"database": dbname, "direct": direct}
        if sslmode:
            params["sslmode"] = sslmode
        got = self._call("GET", f"/v1/branches/{name}/url", params=params)
        return str(got["url"])

    def list_routes(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/routes"))

    def set_route(self, name: str, branch: str, drain: float = 0.0) -> dict[str, Any]:
        return dict(self._call("PUT", f"/v1/routes/{name}", json={"branch": branch, "drain": drain}))

    def sweep(self) -> list[str]:
        return list(self._call("POST", "/v1/sweep")["deleted"])

    def import_dump(self, path: str, branch: str = "production", dbname: str = "postgres") -> dict[str, Any]:
        return dict(self._call("POST", "/v1/import", json={"path": path, "branch": branch, "database": dbname}))

    # -- governance ---------------------------------------------------------------
    def create_principal(self, name: str, role: str) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/principals", json={"name": name, "role": role}))

    def list_principals(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/principals"))

    def revoke_principal(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/principals/{name}"))

    def show_config(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/policy"))

    def reload_config(self, path: str | os.PathLike[str], *, dry_run: bool = False) -> dict[str, Any]:
        """Read the tierbase.toml here, on the client, and upload its text (the server reads no path)."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise TierbaseError(f"cannot read {path}: {err.strerror}", "Give the path of your tierbase.toml") \
                from err
        return self.apply_config(text, str(Path(path).absolute()), dry_run=dry_run)

    def apply_config(self, text: str | None, source: str = "", *, dry_run: bool = False) -> dict[str, Any]:
        body = {"text": text, "source": source, "dry_run": dry_run}
        return dict(self._call("POST", "/v1/policy/reload", json=body))

    def explain(self, principal: str, action: str, target: str, source: str | None = None) -> dict[str, Any]:
        params = {"principal": principal, "action": action, "target": target}
        if source:
            params["source"] = source
        return dict(self._call("GET", "/v1/policy/explain", params=params))

    def audit_log(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._call("GET", "/v1/audit", params=params))

    def audit_verify(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/audit/verify"))

    # -- workflow -------------------------------------------------------------------
    def tls_ca(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/tls/ca"))

    def whoami(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/whoami"))

    def flow_history(self, feature: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/flow/{feature}"))

    # transitions are commands (the platform checks every precondition); there is no event to post
    def flow_register(self, workspace: str, bundle: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/workspaces/{workspace}", json={"workspace": workspace,
                                                                                "bundle": bundle}))

    def flow_tiers(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/flow-tiers"))

    def flow_claim(self, workspace: str, feature: str, parent: str | None = None,
                   local: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/claim",
                               json={"workspace": workspace, "parent": parent, "local": local or {}}))

    def flow_ready(self, feature: str, bundle: str | None, local: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ready", json={"bundle": bundle, "local": local or {}}))

    def flow_approve_tests(self, feature: str, sha: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/approve-tests", json={"sha": sha}))

    def flow_ci(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/ci", json={"local": local or {}}))

    def flow_ci_run(self, run: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/ci/runs/{run}"))

    def flow_ci_runs(self, feature: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/flow/{feature}/ci"))

    def ci_take(self) -> dict[str, Any] | None:
        got = self._call("POST", "/v1/ci/take")["run"]
        return dict(got) if got else None

    def ci_report(self, run: int, junit: str | None, output: str, exit_code: int, duration_s: float) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/ci/runs/{run}/report", json={
            "junit": junit, "output": output, "exit_code": exit_code, "duration_s": duration_s}))

    def flow_merge(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/merge", json={"local": local or {}}))

    def flow_abandon(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/abandon", json={"local": local or {}}))

    def tdd_command(self, feature: str, verb: str, **args: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/flow/{feature}/tdd/{verb}", json=args or None))

    # -- migrations and promotion -------------------------------------------------------
    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("branch", branch), ("dir", migrations_dir)) if v}
        return dict(self._call("GET", "/v1/migrations/status", params=params))

    def migrate_apply(self, branch: str, migrations_dir: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/migrations/apply", json={"branch": branch, "dir": migrations_dir}))

    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/migrations/verify", json={"branch": parent, "dir": migrations_dir}))

    def migrate_lint(self, migrations_dir: str | None = None) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/migrations/lint", params={"dir": migrations_dir} if migrations_dir else {}))

    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/tiers/{tier}/promote", json={"source": source, "dir": migrations_dir}))

    def rollback(self, tier: str, to: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/tiers/{tier}/rollback", json={"to": to}))

    def promotions(self, tier: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/promotions", params={"tier": tier} if tier else {}))

    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> dict[str, Any]:
        params = {"a": a, "format": fmt, **({"b": b} if b else {})}
        return dict(self._call("GET", "/v1/diff", params=params))

    def audit_url(self) -> str:
        return str(self._call("GET", "/v1/audit/url")["url"])
