"""The API's payloads: every answer is typed in the OpenAPI document, and the real answers match the models.

The document is read from the app itself (no server needed); the answers come from a real service
(`tierbase up`, real btrfs and postgres) through the SDK with ``check=True`` and are then checked
strictly here: every field a model does not name is listed, so a payload that grows is noticed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter

from tierbase import payloads as P
from tierbase.api.client import JSON, Client, PayloadDrift, check_payload, payload_type
from tierbase.api.server import create_app
from tierbase.app import Tierbase
from tierbase.provider import FakeProvider

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs
from .test_cli import as_json, leftovers, new_env, tierbase

#: SDK methods that hand back one field of the answer (a list or a string), or pass another method's on
UNCHECKED = {"delete_branch", "sweep", "branch_url", "audit_url", "reload_config"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # the document does not depend on the facade: the routes are only declared, never called
    return create_app(cast(Tierbase, object())).openapi()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield f"{method.upper()} {path}", op


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_every_operation_answers_a_typed_payload(document: dict[str, Any]) -> None:
    untyped = []
    ops = list(operations(document))
    for name, op in ops:
        ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        schemas = [r.get("content", {}).get("application/json", {}).get("schema") or {} for r in ok.values()]
        if not schemas:
            untyped.append(f"{name}: no 2xx answer")
        for schema in schemas:
            body = resolve(document, schema.get("items", schema) if schema.get("type") == "array" else schema)
            if not body.get("properties") and not body.get("anyOf"):
                untyped.append(f"{name}: {schema}")
    assert not untyped, "answers without a schema:\n" + "\n".join(untyped)
    assert len(ops) == 66  # every route of api/server.py (a new one must come with its model)


def test_every_operation_documents_the_one_error_envelope(document: dict[str, Any]) -> None:
    for name, op in operations(document):
        errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
        assert {"401", "403", "404", "422", "500"} <= set(errors), name
        for code, r in errors.items():
            assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}, \
                (name, code)
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's own 422 body is not ours
    body = resolve(document, document["components"]["schemas"]["ErrorEnvelope"]["properties"]["error"])
    assert set(body["properties"]) == {"code", "message", "hint", "data", "exit_code"}
    assert set(body["required"]) == {"code", "message", "hint"}


def test_the_important_fields_say_what_they_are(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert "description" in schemas["Branch"]["properties"]["parent"]
    assert "description" in schemas["SqlResult"]["properties"]["committed"]
    assert "from" in schemas["SchemaDiff"]["properties"]  # the field's wire name, not the Python one


def test_every_sdk_method_names_the_payload_it_returns() -> None:
    public = {n: f for n, f in vars(Client).items() if callable(f) and not n.startswith("_") and n != "close"}
    named = {n: payload_type(f.__wrapped__) for n, f in public.items() if hasattr(f, "__wrapped__")}
    assert set(public) - set(named) == UNCHECKED
    for name, model in named.items():
        inner = [a for a in getattr(model, "__args__", (model,)) if a is not type(None)]
        assert all(isinstance(a, type) and issubclass(a, P.Payload) for a in inner), (name, model)


def test_the_cli_does_not_pay_for_pydantic() -> None:
    """The SDK names its models only in annotations: a CLI call imports neither them nor pydantic."""
    code = ("import sys; from tierbase.cli.main import cli; import tierbase.api.client; "
            "print(sorted(m for m in ('pydantic', 'tierbase.payloads') if m in sys.modules))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"


def test_a_drifted_answer_is_caught_by_the_sdk() -> None:
    good = {"route": "r", "branch": "b", "movable": True, "later": "a field added by a newer service"}
    check_payload(P.Route, good, "list_routes")  # an extra field is not drift
    for bad in ({"route": "r", "branch": "b"}, {"route": "r", "branch": None, "movable": True},
                {"route": "r", "branch": "b", "movable": "perhaps"}, ["not", "an", "object"]):
        with pytest.raises(PayloadDrift) as err:
            check_payload(P.Route, bad, "list_routes")
        assert err.value.code == "payload_drift" and err.value.hint
    with pytest.raises(PayloadDrift):
        check_payload(list[P.Route], [good, {"route": "r"}], "list_routes")


# -- real answers ------------------------------------------------------------------------------------
def extras(obj: Any, at: str = "") -> Iterator[str]:
    """Every field of ``obj`` (a validated payload) that its model does not name, as a dotted path."""
    if isinstance(obj, BaseModel):
        yield from (f"{at}{k}" for k in (obj.model_extra or {}))
        for name in type(obj).model_fields:
            yield from extras(getattr(obj, name), f"{at}{name}.")
    elif isinstance(obj, list):
        for x in obj:
            yield from extras(x, f"{at}[].")


def strict(model: Any, got: Any, *extra: str) -> Any:
    """``got`` validates as ``model`` and carries no field beyond the model's but ``extra``."""
    found = set(extras(TypeAdapter(model).validate_python(got)))
    assert found == set(extra), f"fields the model does not name: {sorted(found - set(extra))}"
    return got


CONFIG = """
[project]
database = "postgres"

[tiers.production]
protected = true
promote = ["platform-engineer"]

[tiers.staging]
parent = "production"
entry = true
promote = ["platform-engineer"]
"""
MIGRATION = {"V1__notes.sql": "CREATE TABLE notes (id int PRIMARY KEY, body text);\n",
             "U1__notes.sql": "DROP TABLE notes;\n"}


def test_the_control_plane_answers_match_their_models_on_the_fake_provider(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The routes that need no postgres, through the real app over FakeProvider: no root, seconds, in CI."""
    monkeypatch.setenv("TIERBASE_PORT_BASE", str(free_port_base()))
    home = Path(tempfile.mkdtemp(prefix="tierbase-fake-")) / "home"
    tb = Tierbase(home, provider=FakeProvider(home))
    tb.init()
    try:
        api = TestClient(create_app(tb))
        api.headers["Authorization"] = f"Bearer {(home / 'api.token').read_text().strip()}"

        def answer(model: Any, method: str, path: str, **kw: Any) -> Any:
            got = api.request(method, path, **kw)
            assert got.status_code < 300, (method, path, got.text)
            return strict(model, got.json())

        answer(P.Health, "GET", "/v1/health")
        answer(P.Status, "GET", "/v1/status")
        answer(list[P.ImageState], "GET", "/v1/masking/images")
        me = answer(P.WhoAmI, "GET", "/v1/whoami")["name"]
        answer(P.PolicyApplied, "POST", "/v1/policy/reload", json={"text": CONFIG, "source": "t", "dry_run": True})
        answer(P.PolicyApplied, "POST", "/v1/policy/reload", json={"text": CONFIG, "source": "t"})
        answer(P.PolicyShown, "GET", "/v1/policy")
        answer(P.Branch, "POST", "/v1/branches", json={"name": "f1", "parent": "staging", "ttl": "1h"})
        answer(P.Branch, "POST", "/v1/branches", json={"name": "s1", "parent": "f1", "snapshot": True})
        answer(list[P.Branch], "GET", "/v1/branches")
        for verb in ("start", "stop", "reset"):
            answer(P.Branch, "POST", f"/v1/branches/f1/{verb}")
        answer(P.RouteMoved, "PUT", "/v1/routes/r1", json={"branch": "f1"})
        answer(list[P.Route], "GET", "/v1/routes")
        answer(P.Explanation, "GET", "/v1/policy/explain",
               params={"principal": me, "action": "branch.create", "target": "production"})
        answer(P.PrincipalCreated, "POST", "/v1/principals", json={"name": "bot", "role": "agent"})
        answer(list[P.Principal], "GET", "/v1/principals")
        answer(P.Principal, "DELETE", "/v1/principals/bot")
        answer(list[P.AuditRecord], "GET", "/v1/audit")
        answer(P.AuditVerify, "GET", "/v1/audit/verify")
        sid = answer(P.SessionStarted, "POST", "/v1/sessions", json={"parent": "staging"})["id"]
        answer(list[P.Session], "GET", "/v1/sessions")
        answer(P.Session, "POST", f"/v1/sessions/{sid}/renew", json={"ttl": "1h"})
        answer(P.SessionEnded, "DELETE", f"/v1/sessions/{sid}")
        answer(P.FlowHistory, "GET", "/v1/flow/f1")
        answer(P.TierRefs, "GET", "/v1/flow-tiers")
        answer(list[P.Promotion], "GET", "/v1/promotions")
        answer(list[P.RollbackSummary], "GET", "/v1/rollbacks")
        answer(P.ImportCheck, "POST", "/v1/import/check")
        answer(P.LintReport, "POST", "/v1/migrations/lint", json={"files": {
            "V1__a.sql": "CREATE TABLE a (id int PRIMARY KEY);\nALTER TABLE a ADD COLUMN b int NOT NULL;\n"}})
        answer(P.Deleted, "POST", "/v1/sweep")
    finally:
        tb.close()
        shutil.rmtree(home.parent, ignore_errors=True)


class Service:
    def __init__(self, sdk: Client, url: str, token: str) -> None:
        self.sdk, self.url, self.token = sdk, url, token


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    home = make_home() / "home"
    env = new_env(home)
    try:
        up = as_json(env, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        token = (home / "api.token").read_text().strip()
        sdk = Client(home, token=token, check=True)  # every answer checked against its model by the SDK too
        yield Service(sdk, str(up["api_url"]), token)
        sdk.close()
    finally:
        tierbase(env, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


@needs_root_btrfs
def test_the_platform_answers_match_their_models(service: Service) -> None:
    sdk = service.sdk
    strict(P.Status, sdk.status())
    strict(P.Space, sdk.space())
    strict(P.WhoAmI, sdk.whoami())
    strict(P.TlsCa, sdk.tls_ca())
    strict(P.PolicyShown, sdk.show_config())
    strict(P.PolicyApplied, sdk.apply_config(CONFIG, "test_openapi", dry_run=True))
    strict(P.PolicyApplied, sdk.apply_config(CONFIG, "test_openapi"))
    strict(list[P.Route], sdk.list_routes())
    me = str(sdk.whoami()["name"])
    strict(P.Explanation, sdk.explain(me, "branch.create", "production"))
    made = strict(P.PrincipalCreated, sdk.create_principal("payload-bot", "agent"))
    strict(list[P.Principal], sdk.list_principals())
    strict(P.Principal, sdk.revoke_principal(str(made["name"])))
    strict(list[P.AuditRecord], sdk.audit_log(limit=20))
    strict(P.AuditVerify, sdk.audit_verify())
    strict(P.TierRefs, sdk.flow_tiers())
    strict(P.FlowHistory, sdk.flow_history("no-such-feature"))


@needs_root_btrfs
def test_branch_answers_match_their_models(service: Service) -> None:
    sdk = service.sdk
    b = strict(P.Branch, sdk.create_branch("pl-one", "production", start=True, ttl="1h"))
    assert b["compute"] == "running" and b["elapsed_ms"] is not None
    strict(P.Branch, sdk.create_branch("pl-snap", "pl-one", snapshot=True))
    strict(list[P.Branch], sdk.list_branches())
    strict(P.Branch, sdk.get_branch("pl-one"))
    sql = strict(P.SqlResult, sdk.run_sql("pl-one", "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)"))
    assert sql["committed"] is True
    rows = strict(P.SqlResult, sdk.run_sql("pl-one", "SELECT id FROM t ORDER BY id", max_rows=1))
    assert rows["truncated"] is True and rows["rows"] == [[1]]
    strict(P.RouteMoved, sdk.set_route("pl-route", "pl-one"))
    strict(P.Branch, sdk.stop_branch("pl-one"))
    strict(P.Branch, sdk.start_branch("pl-one"))
    strict(P.Branch, sdk.reset_branch("pl-one"))
    started = strict(P.SessionStarted, sdk.session_start(parent="production", ttl="10m"))
    strict(list[P.Session], sdk.session_list())
    strict(P.Session, sdk.session_renew(str(started["id"]), "20m"))
    strict(P.SessionEnded, sdk.session_end(str(started["id"])))
    assert sdk.delete_branch("pl-snap") == ["pl-snap"]


@needs_root_btrfs
def test_migration_answers_match_their_models(service: Service) -> None:
    sdk = service.sdk
    strict(P.LintReport, sdk.migrate_lint(files=MIGRATION))
    strict(P.MigrationStatus, sdk.migrate_status("staging", files=MIGRATION))
    strict(P.VerifyReport, sdk.migrate_verify("staging", files=MIGRATION))
    strict(P.Branch, sdk.create_branch("pl-mig", "staging"))
    strict(P.MigrationsApplied, sdk.migrate_apply("pl-mig", files=MIGRATION))
    strict(P.SchemaDiff, sdk.diff("staging", "pl-mig"))
    strict(P.DataDiff, sdk.data_diff("staging", "pl-mig", fmt="json"))
    strict(P.MigrationsApplied, sdk.migrate_apply("staging", files=MIGRATION))
    strict(P.Promotion, sdk.promote("production", "staging", files=MIGRATION))
    strict(list[P.Promotion], sdk.promotions("production"))
    strict(P.RollbackResult, sdk.rollback("production", dry_run=True))
    strict(P.RollbackResult, sdk.rollback("production"))
    strict(list[P.RollbackSummary], sdk.rollbacks("production"))
    strict(P.TierHistory, sdk.history("production"))


@needs_root_btrfs
def test_every_error_answer_is_the_one_envelope(service: Service) -> None:
    sdk, url = service.sdk, service.url
    bot: JSON = sdk.create_principal("payload-agent", "agent")
    owner = {"Authorization": f"Bearer {service.token}"}
    agent = {"Authorization": f"Bearer {bot['token']}"}
    cases: list[tuple[str, str, dict[str, str], Any, int, str]] = [
        ("GET", "/v1/branches", {}, None, 401, "unauthorized"),
        ("GET", "/v1/no-such-endpoint", owner, None, 404, "not_found"),
        ("DELETE", "/v1/whoami", owner, None, 405, "method_not_allowed"),
        ("POST", "/v1/branches", owner, {"parent": "production"}, 422, "invalid_input"),
        ("GET", "/v1/branches/no-such-branch", owner, None, 404, "branch_not_found"),
        ("POST", "/v1/principals", agent, {"name": "x", "role": "agent"}, 403, "policy_denied"),
    ]
    with httpx.Client(base_url=url, timeout=60) as http:
        for method, path, headers, body, status, code in cases:
            got = http.request(method, path, headers=headers, json=body)
            assert got.status_code == status, (method, path, got.text)
            env = P.ErrorEnvelope.model_validate(got.json())  # extra="forbid": exactly the envelope
            assert env.error.code == code and env.error.message and env.error.hint, got.text
            assert json.loads(got.text)["error"]["exit_code"] in (1, 2)
