"""Installed as users install it (``pip install .``, not editable; or a wheel): the property files ship
inside the package and the ``recbole-perpeft`` console script trains and evaluates from any folder."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import recbole_perpeft
from tests.tiny import REPO_ROOT

PACKAGE = REPO_ROOT / "recbole_perpeft"
PROPERTY_FILES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (PACKAGE / "properties").rglob("*.yaml"))


def copy_source(dest: Path) -> Path:
    """What building needs (top-level files such as setup.cfg, pyproject.toml, README.md, and the package),
    copied so that pip's in-tree build writes its build/ and *.egg-info there, not into the working tree,
    and no stale build/lib of an earlier build can end up in the wheel."""
    dest.mkdir()
    for path in REPO_ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    shutil.copytree(PACKAGE, dest / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def make_venv(path: Path) -> Path:
    """A virtualenv that sees the packages of the environment running the tests (torch, RecBole, transformers,
    the MiniLM wheel, setuptools, pip: no network, no ensurepip) through a .pth file that adds that
    environment's site-packages *after* its own.

    Not ``system_site_packages=True``: from inside a venv that inherits the base interpreter's packages
    (pyenv's setuptools 65, no ``wheel``, no torch), not the test environment's, so the offline build
    failed in a fresh venv ("invalid command 'bdist_wheel'"). The test extra brings setuptools>=70.1,
    which builds wheels by itself.

    The project may also be installed editable in the outer environment. Its editable finder (loaded by a
    .pth there) is *appended* to ``sys.meta_path``, after the regular PathFinder, and the venv's
    site-packages comes first on ``sys.path``, so the venv's non-editable copy wins. The test asserts where
    the import comes from rather than relying on this."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False, clear=True).create(path)
    python = path / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    outer = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    lines = [f"import site; site.addsitedir({site_dir!r})" for site_dir in outer]
    (Path(inner) / "_test_environment.pth").write_text("\n".join(lines) + "\n")
    return python


def clean_env() -> dict:
    """Offline, the repo not on PYTHONPATH, pip never reaching an index."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def check_run(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="venv layout (bin/) and console script path are POSIX")
def test_installed_console_script_runs_from_another_folder(tmp_path):
    pytest.importorskip("pip", reason="builds the wheel with this environment's pip, and it has none (a uv venv?)")
    source = copy_source(tmp_path / "src")
    python = make_venv(tmp_path / "venv")
    work = tmp_path / "work"  # neither the repo nor the source copy
    work.mkdir()
    pip = [str(python), "-m", "pip", "--quiet"]

    # The wheel holds the property files and the console script.
    check_run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], work)
    (wheel,) = (tmp_path / "dist").glob(f"recbole_perpeft-{recbole_perpeft.__version__}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert PROPERTY_FILES and set(PROPERTY_FILES) <= names, sorted(set(PROPERTY_FILES) - names)
        assert "recbole_perpeft/py.typed" in names  # type checkers read the package's annotations
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "recbole-perpeft = recbole_perpeft.cli:main" in archive.read(entry_points).decode()

    # Non-editable install of the source tree into the venv.
    check_run([*pip, "install", "--no-deps", "--no-build-isolation", str(source)], work)
    site_packages = Path(
        check_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip()
    )
    imported = check_run([str(python), "-c", "import recbole_perpeft; print(recbole_perpeft.__file__)"], work)
    assert Path(imported.stdout.strip()) == site_packages / "recbole_perpeft" / "__init__.py", imported.stdout
    assert (site_packages / "recbole_perpeft" / "properties" / "overall.yaml").is_file()

    script = python.parent / "recbole-perpeft"
    assert script.is_file()
    proc = check_run(
        [str(script), "--model=FrozenMM", "--dataset=ml-100k", "--epochs=1", "--user_sample_ratio=0.1",
         "--result_file=r.json"],
        work,
        timeout=600,
    )  # fmt: skip
    result = json.loads((work / "r.json").read_text())
    assert result["model"] == "FrozenMM" and result["dataset"] == "ml-100k", proc.stderr[-2000:]
    assert 0.0 <= result["test_result"]["hit@20"] <= 1.0


def test_version_is_the_package_metadata_version():
    # setup.cfg reads it (version = attr: ...); an installed copy's metadata must say the same.
    assert re.fullmatch(r"\d+\.\d+\.\d+", recbole_perpeft.__version__)
    assert "version = attr: recbole_perpeft.__version__" in (REPO_ROOT / "setup.cfg").read_text()
    assert importlib.metadata.version("recbole-perpeft") == recbole_perpeft.__version__


def test_importing_the_plots_leaves_the_users_matplotlib_backend_alone(tmp_path):
    # It used to call matplotlib.use("Agg") at import; the figures now come from the object API.
    code = (
        "import matplotlib, recbole_perpeft.analysis.plots as plots; "
        "path = plots.group_sizes([3, 1, 2], 'sizes.png'); "
        "print(matplotlib.get_backend(), open(path, 'rb').read(8))"
    )
    env = {**clean_env(), "MPLBACKEND": "svg", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "svg", proc.stdout
    assert "PNG" in proc.stdout  # the file is a PNG whatever the backend


def test_ci_runs_the_readmes_commands():
    # .ci/run runs these in fresh venvs; a README edit that CI does not follow would go unproven.
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = dict(re.findall(r"^(QUICK_INSTALL|QUICK_RUN|TEST_COMMAND)='(.*)'$", ci, re.M))
    readme_lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert f"{commands['QUICK_INSTALL']} && {commands['QUICK_RUN']}" in readme_lines
    assert commands["TEST_COMMAND"] in readme_lines
