"""One settings table: every setting named once, with a default, help and its variable; no other
module reads TIERBASE_* from the environment; a bad value is refused with what to do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tierbase import settings
from tierbase.errors import InvalidInput

PACKAGE = Path(__file__).resolve().parent.parent / "tierbase"


def test_every_setting_has_help_a_default_of_its_kind_and_a_tierbase_variable() -> None:
    envs = [s.env for s in settings.SETTINGS.values() if s.env]
    assert len(envs) == len(set(envs))
    for s in settings.SETTINGS.values():
        assert s.help and not s.help.endswith("."), s.name
        assert s.env is None or s.env == f"TIERBASE_{s.name.upper()}", s.name
        if s.default is not None and s.parse is not str:
            assert s.parse(str(s.default).lower()) == s.default, s.name
    assert {d["name"] for d in settings.describe()} == set(settings.SETTINGS)


def test_the_environment_overrides_and_a_bad_value_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERBASE_SWEEP_INTERVAL", raising=False)
    assert settings.value("sweep_interval") == 30.0
    monkeypatch.setenv("TIERBASE_SWEEP_INTERVAL", "2.5")
    assert settings.value("sweep_interval") == 2.5
    monkeypatch.setenv("TIERBASE_SWEEP_INTERVAL", "")  # empty counts as unset
    assert settings.value("sweep_interval") == 30.0
    monkeypatch.setenv("TIERBASE_SWEEP_INTERVAL", "soon")
    with pytest.raises(InvalidInput, match="TIERBASE_SWEEP_INTERVAL='soon' is not a number of seconds") as err:
        settings.value("sweep_interval")
    assert "unset it for the default 30.0" in err.value.hint
    with pytest.raises(InvalidInput, match="'nope' is not a tierbase setting"):
        settings.default("nope")


def test_the_platform_constants_come_from_the_table() -> None:
    from tierbase.compute import ports
    from tierbase.storage.btrfs import DEFAULT_IMAGE_SIZE

    table = [settings.default(n) for n in ("api_port", "proxy_port", "port_base", "compute_ports", "btrfs_size")]
    assert table == [ports.API_PORT, ports.PROXY_PORT, ports.PORT_BASE, ports.COMPUTE_PORTS, DEFAULT_IMAGE_SIZE]


def _env_reads(tree: ast.AST) -> list[str]:
    """TIERBASE_* names read through os.environ.get / os.environ[...] / os.getenv."""
    found = []
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv", "environ.get"):
            arg = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
            arg = node.slice
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("TIERBASE_"):
            found.append(arg.value)
    return found


def test_no_module_but_settings_reads_tierbase_variables() -> None:
    reads = {str(p.relative_to(PACKAGE)): got for p in sorted(PACKAGE.rglob("*.py"))
             if p.name != "settings.py" and (got := _env_reads(ast.parse(p.read_text())))}
    assert reads == {}
    assert _env_reads(ast.parse('import os\nos.environ.get("TIERBASE_X")\nos.environ["TIERBASE_Y"]')) == [
        "TIERBASE_X", "TIERBASE_Y"]


def test_the_cli_s_light_modules_keep_their_value_semantics() -> None:
    """settings and home are plain classes now (the CLI imports them; dataclasses costs it ~12 ms)."""
    import copy
    import pickle

    from tierbase.home import Home

    home = Home(Path("/data"))
    assert home == Home(Path("/data")) and home != Home(Path("/other")) and len({home, Home(Path("/data"))}) == 1
    assert copy.deepcopy(home) == pickle.loads(pickle.dumps(home)) == home and home.token == Path("/data/api.token")
    with pytest.raises(AttributeError):
        home.root = Path("/elsewhere")
    s = settings.setting("sweep_interval")
    assert (s.name, s.env, s.parse, s.stored) == ("sweep_interval", "TIERBASE_SWEEP_INTERVAL", float, False)
