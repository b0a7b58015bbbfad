"""`tierbase diff A B --data` and `tierbase rollback --dry-run` through the CLI, the SDK and the running service."""

from __future__ import annotations

from .conftest import needs_root_btrfs, query
from .test_cli import as_json, tierbase
from .test_cli import env as env

pytestmark = needs_root_btrfs


def test_data_diff_and_rollback_through_the_cli(env: dict[str, str]) -> None:
    tierbase(env, "branch", "create", "dd-a", "--parent", "production")
    url = as_json(env, "branch", "url", "dd-a")["url"]
    query(url, "CREATE TABLE pets (id int PRIMARY KEY, name text, photo bytea)")
    query(url, "INSERT INTO pets SELECT g, 'pet ' || g, decode(md5(g::text), 'hex') FROM generate_series(1, 2000) g")
    tierbase(env, "branch", "create", "dd-b", "--parent", "dd-a")
    query(as_json(env, "branch", "url", "dd-b")["url"],
          "UPDATE pets SET name = 'renamed' WHERE id IN (7, 1500); DELETE FROM pets WHERE id = 3; "
          "INSERT INTO pets VALUES (5000, 'new', '\\x00')")
    d = as_json(env, "diff", "dd-a", "dd-b", "--data", "--table", "pets")
    assert d["from"] == "dd-a" and d["to"] == "dd-b"
    assert [t["counts"] for t in d["tables"]] == [{"inserted": 1, "updated": 2, "deleted": 1}]
    text = tierbase(env, "diff", "dd-a", "dd-b", "--data").stdout
    assert "public.pets: +1 inserted, ~2 updated, -1 deleted" in text
    script = tierbase(env, "diff", "dd-a", "dd-b", "--format", "sql").stdout
    assert script.startswith("-- data diff dd-a -> dd-b") and "DELETE FROM" in script and "COMMIT;" in script
    # bad input: exit 1 with what to do; a tier without promotions has nothing to roll back to (exit 2)
    same = tierbase(env, "diff", "dd-a", "dd-a", "--data", check=False)
    assert same.returncode == 1 and "same branch" in same.stderr
    none = tierbase(env, "rollback", "production", "--dry-run", check=False)
    assert none.returncode == 2 and "no pre-promotion snapshot" in none.stderr
    tierbase(env, "branch", "delete", "dd-a", "--recursive")
