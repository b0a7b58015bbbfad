"""The hot commands' fast path (cli/fast.py) against click: the same reading of every argv, the same
request, output, errors and exit codes; what it is not sure of, and --help, stay click's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from tierbase.cli import fast
from tierbase.cli.base import root
from tierbase.cli.hot import HOT

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs

#: argvs both parsers must read alike (the fast parser takes each of them)
TAKEN = [
    ["branch", "create", "x"],
    ["branch", "create", "x", "--parent", "staging"],
    ["branch", "create", "--parent=staging", "x", "--json"],
    ["branch", "create", "x", "--ttl", "2h", "--snapshot", "--start"],
    ["branch", "create", "--json", "x", "--at", "2026-01-01T00:00:00+00:00", "--exclusive"],
    ["branch", "create", "x", "--lsn", "0/1A2B3C4"],
    ["branch", "create", "x", "--parent="],
    ["branch", "create", "x", "--at=-5m"],
    ["branch", "create", "x", "--at", "-5m"],
    # an option's value is the next token, whatever it is (click's parser): not another option, not --help
    ["branch", "create", "x", "--parent", "--start"],
    ["branch", "create", "x", "--ttl", "--help"],
    ["branch", "create", "x", "--parent", "--"],
    ["--home", "--api", "branch", "create", "x"],
    ["--home", "-", "branch", "create", "x"],
    ["branch", "create", "Not A Name"],
    ["branch", "create", ""],
    ["--home", "/tmp/somewhere", "branch", "create", "x"],
    ["--home=/tmp/h", "--api", "http://127.0.0.1:1", "branch", "delete", "x", "--recursive"],
    ["--api=http://127.0.0.1:1", "--home", "", "branch", "delete", "x"],
    ["branch", "delete", "x", "--json"],
    ["branch", "show", "x"], ["branch", "reset", "x", "--json"], ["--api", "http://h:1", "branch", "start", "x"],
    ["branch", "stop", "--json", "x"],
]

#: argvs the fast parser leaves to click: click's errors, --help, and what it is not sure of
LEFT = [
    [], ["--help"], ["-h"], ["--version"], ["--home"], ["branch"], ["brnch", "create", "x"],
    ["branch", "crate", "x"], ["branch", "create"], ["branch", "create", "x", "y"],
    ["branch", "create", "x", "--parent"], ["branch", "create", "x", "--nope"],
    ["branch", "create", "x", "--start=yes"], ["branch", "create", "x", "--help"], ["branch", "create", "-h"],
    ["branch", "create", "--", "-x"], ["branch", "create", "-x"], ["branch", "create", "x", "--recursive"],
    ["branch", "delete", "x", "--parent", "p"], ["--json", "branch", "create", "x"],
    ["branch", "--json", "create", "x"], ["--home", "/etc/passwd", "branch", "create", "x"],
    # click reads these (the last one wins); the fast parser is not sure
    ["branch", "create", "x", "--ttl", "1h", "--ttl", "2h"], ["branch", "create", "x", "--json", "--json"],
    ["--home", "/a", "--home", "/b", "branch", "create", "x"],
    ["branch", "list"], ["branch", "url", "x"], ["status"], ["branch", "show"], ["branch", "start", "x", "y"],
    ["branch", "stop", "x", "--recursive"], ["branch", "reset", "--help"],
]


def by_click(argv: list[str]) -> tuple[dict[str, Any], tuple[str, str], dict[str, Any]] | str:
    """How click reads ``argv``: the root's values, the command, its values; or the exception it raises."""
    cli = root()
    try:
        with cli.make_context("tierbase", list(argv)) as ctx:
            name, group, rest = cli.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
            assert isinstance(group, click.Group) and name is not None
            with group.make_context(name, rest, parent=ctx) as gctx:
                cname, cmd, crest = group.resolve_command(gctx, [*gctx._protected_args, *gctx.args])
                assert cmd is not None and cname is not None
                with cmd.make_context(cname, crest, parent=gctx) as cctx:
                    return dict(ctx.params), (name, cname), dict(cctx.params)
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort) as err:
        return type(err).__name__


def by_fast(argv: list[str]) -> tuple[dict[str, Any], tuple[str, str], dict[str, Any]] | None:
    got = fast.parse(argv)
    if got is None:
        return None
    cmd, where, values, as_json = got
    return where, (cmd.group, cmd.name), {**values, "as_json": as_json}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIERBASE_HOME", "TIERBASE_API", "_TIERBASE_COMPLETE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("argv", TAKEN, ids=" ".join)
def test_both_parsers_read_an_argv_alike(argv: list[str]) -> None:
    clicked = by_click(argv)
    assert not isinstance(clicked, str), f"click refuses {argv}: {clicked}"
    assert by_fast(argv) == clicked


@pytest.mark.parametrize("argv", LEFT, ids=" ".join)
def test_what_the_fast_parser_is_not_sure_of_is_left_to_click(argv: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert by_fast(argv) is None
    assert not fast.run(argv)  # declined before any request: nothing printed, nothing imported
    assert capsys.readouterr() == ("", "")


def test_the_environment_is_read_as_click_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv = ["branch", "create", "x"]
    for home, api in ((str(tmp_path), "http://127.0.0.1:1"), ("", ""), (str(tmp_path / "nothing-yet"), "")):
        monkeypatch.setenv("TIERBASE_HOME", home)
        monkeypatch.setenv("TIERBASE_API", api)
        assert by_fast(argv) == by_click(argv)
        assert by_fast(["--home", "/elsewhere", *argv]) == by_click(["--home", "/elsewhere", *argv])
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TIERBASE_HOME", str(tmp_path / "a-file"))  # click.Path(file_okay=False) refuses it
    assert by_fast(argv) is None and isinstance(by_click(argv), str)
    monkeypatch.setenv("_TIERBASE_COMPLETE", "bash_complete")  # shell completion is click's
    monkeypatch.delenv("TIERBASE_HOME")
    assert not fast.run(argv)


def test_each_click_command_is_built_from_its_declaration() -> None:
    """The declaration is the only list of a hot command's parameters: click's command holds the same."""
    cli = root()
    for (group, name), spec in HOT.items():
        grp = cli.commands[group]
        assert isinstance(grp, click.Group)
        cmd = grp.commands[name]
        # (the defaults are compared where they matter: in what both parsers read, above)
        got = [(p.name, p.opts, getattr(p, "is_flag", False), getattr(p, "help", None)) for p in cmd.params]
        want = [(p.name, [p.opt] if p.opt else [p.name], p.flag, p.help or None) for p in spec.params]
        want.append(("as_json", ["--json"], True, "Print machine-readable JSON."))
        assert got == want
        assert cmd.help == spec.doc


def test_help_still_comes_from_click() -> None:
    for flag in ("--help", "-h"):
        got = subprocess.run([sys.executable, "-m", "tierbase.cli.main", "branch", "create", flag],
                             capture_output=True, text=True, check=True)
        assert got.stdout.startswith("Usage: tierbase branch create [OPTIONS] NAME")
        assert "--parent TEXT  Branch to fork (default: production)." in got.stdout
        assert "--json         Print machine-readable JSON." in got.stdout


# -- against a running platform ------------------------------------------------------------
CLICK_ONLY = ("import sys\nfrom tierbase.cli.base import invoked, root\nargs = sys.argv[1:]\n"
              "root(only=invoked(args))(args=args, prog_name='tierbase')")
#: fields that differ between two creates of the same name (time, place) and the text's elapsed time
VOLATILE = re.compile(r'("(?:created_at|elapsed_ms|fork_lsn|port|pid|age|expires_at|expires_in|volume|own_bytes)": )'
                      r'("[^"]*"|[0-9.]+|null)|in [0-9.]+ ms')


#: the same in `branch show`'s text
VOLATILE_TEXT = re.compile(r"(?m)^( *(?:age|own_bytes|expires_in|pid): ).*$")


def cli_run(env: dict[str, str], *argv: str, click_only: bool = False) -> tuple[int, str, str]:
    pre = ["-c", CLICK_ONLY] if click_only else ["-m", "tierbase.cli.main"]
    got = subprocess.run([sys.executable, *pre, *argv], env=env, capture_output=True, text=True, timeout=120)

    def same(text: str) -> str:
        return VOLATILE_TEXT.sub(r"\1_", VOLATILE.sub(r"\1_", text))

    return got.returncode, same(got.stdout), same(got.stderr)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    home = make_home() / "home"
    e = dict(os.environ, TIERBASE_HOME=str(home), TIERBASE_PORT_BASE=str(free_port_base()))
    e.pop("TIERBASE_TOKEN", None)
    cmd = [sys.executable, "-m", "tierbase.cli.main", "up", "--btrfs-size", "1G", "--api-port", str(free_port()),
           "--proxy-port", str(free_port()), "--json"]
    try:
        subprocess.run(cmd, env=e, capture_output=True, text=True, check=True, timeout=300)
        e["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        yield e
    finally:
        subprocess.run([sys.executable, "-m", "tierbase.cli.main", "down", "--purge"], env=e, capture_output=True,
                       timeout=300)
        shutil.rmtree(home.parent, ignore_errors=True)


@needs_root_btrfs
@pytest.mark.parametrize("argv", [
    ("branch", "create", "fast-a"),
    ("branch", "create", "fast-a", "--json"),
    ("branch", "create", "fast-a", "--ttl", "2h", "--snapshot", "--json"),
    ("branch", "create", "Not A Name"),
    ("branch", "create", "fast-b", "--parent", "nope", "--json"),
    ("branch", "create", "fast-b", "--ttl", "forever"),
    ("branch", "create", "production"),
    ("branch", "delete", "production"),
    ("branch", "delete", "production", "--json"),
    ("branch", "delete", "ghost"),
    ("branch", "show", "fast-s"),
    ("branch", "show", "fast-s", "--json"),
    ("branch", "show", "ghost", "--json"),
    ("branch", "stop", "fast-s"),
    ("branch", "stop", "fast-s", "--json"),
    ("branch", "reset", "fast-s"),
    ("branch", "reset", "production"),
    ("branch", "start", "ghost"),
], ids=" ".join)
def test_the_fast_path_and_click_answer_alike(env: dict[str, str], argv: tuple[str, ...]) -> None:
    """Same stdout, stderr and exit code (a made branch is deleted before the other path makes it again)."""
    subprocess.run([sys.executable, "-m", "tierbase.cli.main", "branch", "create", "fast-s"], env=env,
                   capture_output=True, timeout=120)  # the branch show/stop/reset look at (exit 1 if it exists)
    got = []
    for click_only in (False, True):
        got.append(cli_run(env, *argv, click_only=click_only))
        if argv[1] == "create" and got[-1][0] == 0:
            assert cli_run(env, "branch", "delete", argv[2])[0] == 0
    assert got[0] == got[1]
    ok = argv[2] in ("fast-a", "fast-s")
    assert got[0][0] == (0 if ok else 2 if argv[2] == "production" and argv[1] in ("delete", "reset") else 1)


@needs_root_btrfs
def test_start_through_the_fast_path(env: dict[str, str]) -> None:
    """`branch start` says where the compute runs (pid and port differ between runs: compared in shape)."""
    subprocess.run([sys.executable, "-m", "tierbase.cli.main", "branch", "create", "fast-s"], env=env,
                   capture_output=True, timeout=120)
    got = []
    for click_only in (False, True):
        code, out, err = cli_run(env, "branch", "start", "fast-s", click_only=click_only)
        got.append((code, re.sub(r"pid [0-9]+", "pid _", out), err))
        assert cli_run(env, "branch", "stop", "fast-s")[0] == 0
    assert got[0] == got[1] and got[0][0] == 0
    assert re.fullmatch(r"fast-s: compute running \(pid _, port [0-9]+\)\n", got[0][1]), got


@needs_root_btrfs
def test_a_fast_create_and_delete_do_not_import_click(env: dict[str, str]) -> None:
    # what the command loaded beyond what the interpreter had at start (a site hook may load typing)
    probe = ("import sys\nbefore = set(sys.modules)\nfrom tierbase.cli.main import main\nmain(sys.argv[1:])\n"
             "print('loaded:', sorted(m for m in ('click', 'typing', 'dataclasses', 'inspect', 'rich', 'httpx') "
             "if m in set(sys.modules) - before), file=sys.stderr)")
    for argv in (["branch", "create", "fast-c", "--json"], ["branch", "delete", "fast-c"]):
        got = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True,
                             timeout=120, check=True)
        assert got.stderr.strip().splitlines()[-1] == "loaded: []"
    names = cli_run(env, "branch", "list", "--names")[1].split()
    assert "production" in names and "fast-c" not in names


def test_a_service_that_does_not_answer_is_the_same_error(tmp_path: Path) -> None:
    env = dict(os.environ, TIERBASE_HOME=str(tmp_path / "none"), TIERBASE_TOKEN="t")
    dead = f"http://127.0.0.1:{free_port()}"
    for argv in (("--api", dead, "branch", "create", "x"), ("branch", "delete", "x", "--json")):
        fast_got, click_got = cli_run(env, *argv), cli_run(env, *argv, click_only=True)
        assert fast_got == click_got and fast_got[0] == 1 and fast_got[2].startswith("Error: ")
