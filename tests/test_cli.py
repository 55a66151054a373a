"""The command line (recbole_perpeft/cli.py): the subcommands' help, the dispatch table, ``run`` as the
default command, the reserved ``tune`` and ``report``, and the old ``python -m`` entry points' one line.
Nothing here trains: the dispatch tests replace the commands' functions with recorders."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

from recbole_perpeft import cli
from tests.tiny import REPO_ROOT, RUN_SCRIPT

OLD_ENTRY_POINTS = {
    "recbole_perpeft.reproduce": "recbole-perpeft reproduce",
    "recbole_perpeft.analyze": "recbole-perpeft analyze",
    "recbole_perpeft.data.prepare": "recbole-perpeft prepare",
}
HELP_COMMANDS = ["run", "compare", "reproduce", "analyze", "analyze sweep", "analyze curves", "analyze cost",
                 "prepare", "recommend", "export"]  # fmt: skip


def python(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_command_with_its_line_and_imports_none_of_them():
    proc = python(str(RUN_SCRIPT), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: recbole-perpeft [<command>]")
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name}" in proc.stdout and summary in proc.stdout
    code = ("import sys; from recbole_perpeft.cli import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith(('recbole_perpeft', 'torch', 'recbole'))))")
    loaded = python("-c", code).stdout.strip().splitlines()[-1]
    assert loaded == "['recbole_perpeft', 'recbole_perpeft.cli', 'recbole_perpeft.cli_common']"


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_each_command_has_its_help(command):
    proc = python(str(RUN_SCRIPT), *command.split(), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: recbole-perpeft {command} "), proc.stdout[:300]
    assert "deprecated" not in proc.stderr


def test_the_dispatch_table_names_functions_that_exist():
    for name, (target, summary) in cli.COMMANDS.items():
        module, _, function = target.partition(":")
        assert summary and "\n" not in summary
        if name == "report":  # issue 41's module may not be there yet: tested below
            continue
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n not in ("tune", "report")])
def test_a_command_gets_the_arguments_after_its_name(name, monkeypatch):
    module, _, function = cli.COMMANDS[name][0].partition(":")
    calls = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda argv: calls.append(argv) or 0)
    assert cli.main([name, "--dataset=D", "--epochs=1"]) == 0
    assert calls == [["--dataset=D", "--epochs=1"]]


def test_what_a_command_returns_for_its_callers_is_no_exit_status(monkeypatch):
    monkeypatch.setattr(importlib.import_module("recbole_perpeft.analyze"), "main", lambda argv: "out/cost.png")
    assert cli.main(["analyze", "cost", "--results=a.json"]) is None  # sys.exit(None): status 0


@pytest.fixture
def runs(monkeypatch):
    """Replaces training: records quick_start.run and the comparison."""
    calls = []
    quick_start = importlib.import_module("recbole_perpeft.quick_start")
    monkeypatch.setattr(quick_start, "run", lambda model, dataset, **kw: calls.append(("run", model, dataset, kw)))
    monkeypatch.setattr(cli, "run_comparison", lambda args, files, overrides: calls.append(
        ("compare", args.model, args.dataset, args.seeds, overrides)))  # fmt: skip
    return calls


def test_no_command_is_run_as_before(runs):
    cli.main(["--model=SASRec", "--dataset=ml-100k", "--epochs=1", "--topk=[5, 10]"])
    cli.main(["run", "--model=SASRec", "--dataset=ml-100k", "--epochs=1", "--topk=[5, 10]"])
    expected = {"config_file_list": None, "config_dict": {"epochs": "1", "topk": [5, 10]}, "result_file": None,
                "resume": None}  # fmt: skip
    assert runs == [("run", "SASRec", "ml-100k", expected)] * 2


def test_several_models_or_seeds_compare_as_before_and_compare_always_does(runs):
    cli.main(["--model=GlobalPEFT,PerPEFT", "--dataset=D"])
    cli.main(["--model=PerPEFT", "--dataset=D", "--seeds=3"])
    cli.main(["run", "--model=A,B", "--dataset=D"])
    cli.main(["compare", "--model=PerPEFT", "--dataset=D", "--epochs=2"])
    assert runs == [
        ("compare", "GlobalPEFT,PerPEFT", "D", None, {}),
        ("compare", "PerPEFT", "D", "3", {}),
        ("compare", "A,B", "D", None, {}),
        ("compare", "PerPEFT", "D", None, {"epochs": "2"}),
    ]


def test_the_resume_hint_repeats_the_command_as_typed():
    args = cli.parse_args(["--model=PerPEFT"])[0]
    hint = cli.interrupted_message("saved/X.pth", args, ["run", "--model=PerPEFT", "--resume=old.pth"])
    assert hint == "interrupted: resume with  recbole-perpeft run --model=PerPEFT --resume=saved/X.pth"


def test_unknown_command_is_one_line_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["sweep", "--dataset=D"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: unknown command 'sweep'") and "analyze" in err and "tune" in err


def test_tune_is_reserved_for_issue_43(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune", "--model=PerPEFT"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "issue 43" in err
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune", "--help"])
    assert stop.value.code == 0


def test_report_goes_to_issue_41s_module(monkeypatch):
    calls = []
    module = types.ModuleType("recbole_perpeft.experiments.results_report")
    module.main = lambda argv: calls.append(argv)
    monkeypatch.setitem(sys.modules, "recbole_perpeft.experiments.results_report", module)
    cli.main(["report", "--runs=DIR"])
    assert calls == [["--runs=DIR"]]


def test_a_command_whose_module_cannot_be_imported_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "report", ("recbole_perpeft.no_such_module:main", "tables"))
    with pytest.raises(SystemExit) as stop:
        cli.main(["report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: recbole-perpeft report is not available here: cannot import recbole_perpeft.no_such")


@pytest.mark.parametrize("module", OLD_ENTRY_POINTS)
def test_an_old_entry_point_still_works_and_says_so_in_one_line(module):
    proc = python("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {OLD_ENTRY_POINTS[module]} ")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"deprecated: 'python -m {module}' is now '{OLD_ENTRY_POINTS[module]}'; "
                     "the old form goes in the next release."]  # fmt: skip
