"""Installed as users install it (``pip install .``, not editable; or a wheel): the property files ship
inside the package and the ``recbole-perpeft`` console script trains and evaluates from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

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
    """A virtualenv that sees the system site-packages (torch, RecBole, transformers, the MiniLM wheel are
    reused: no network) and has no pip of its own: ``venv/bin/python -m pip`` runs the system's pip,
    which installs into the running interpreter's environment, i.e. the venv (and no ensurepip: fast).

    The project may also be installed editable in the system site-packages (``pip install -e .``).
    setuptools' editable finder (``__editable___*_finder.py``, loaded by a .pth) is *appended* to
    ``sys.meta_path``, after the regular PathFinder, and the venv's site-packages comes before the system's
    on ``sys.path``, so the venv's non-editable copy wins and the editable one is only a fallback. The test
    asserts where the import comes from rather than relying on this."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False, clear=True).create(path)
    return path / "bin" / "python"


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
    source = copy_source(tmp_path / "src")
    python = make_venv(tmp_path / "venv")
    work = tmp_path / "work"  # neither the repo nor the source copy
    work.mkdir()
    pip = [str(python), "-m", "pip", "--quiet"]

    # The wheel holds the property files and the console script.
    check_run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], work)
    (wheel,) = (tmp_path / "dist").glob("recbole_perpeft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert PROPERTY_FILES and set(PROPERTY_FILES) <= names, sorted(set(PROPERTY_FILES) - names)
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
