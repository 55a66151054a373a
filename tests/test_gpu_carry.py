"""``bench/gpu_pack.sh`` packs wheels and datasets into checksummed parts, one per device call, and
``bench/gpu_env.sh`` unpacks them on the device once all are there, then runs a command with them. A stand-in
pip records its calls and writes fake wheels (the real ones need a registry; docs/gpu.md says how
the real pack was checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.tiny import REPO_ROOT

PACK = REPO_ROOT / "bench" / "gpu_pack.sh"
ENV = REPO_ROOT / "bench" / "gpu_env.sh"
STUB_PIP = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "download":
    folder = args[args.index("-d") + 1]
    for requirement in args[args.index("-d") + 2:]:
        name = requirement.split("==")[0].replace("-", "_")
        with open(os.path.join(folder, name + "-0.1-py3-none-any.whl"), "wb") as wheel:
            wheel.write(os.urandom(5000))
elif args[0] == "install":
    target = args[args.index("--target") + 1]
    os.makedirs(target, exist_ok=True)
    for wheel in (a for a in args if a.endswith(".whl")):
        open(os.path.join(target, os.path.basename(wheel) + ".installed"), "w").close()
"""


def stub_env(tmp_path, **more):
    pip = tmp_path / "pip"
    pip.write_text(STUB_PIP.format(python=sys.executable))
    pip.chmod(0o755)
    return {**os.environ, "PIP": str(pip), "PIP_LOG": str(tmp_path / "pip.log"), "PYTHON": sys.executable, **more}


def pip_calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "pip.log").read_text().splitlines()]


def run(script, *args, env):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def test_pack_then_unpack_over_several_calls(tmp_path):
    data = tmp_path / "data" / "amazon-scientific"
    data.mkdir(parents=True)
    originals = {"amazon-scientific.inter": os.urandom(9000), "amazon-scientific.item": os.urandom(4000)}
    for name, content in originals.items():
        (data / name).write_bytes(content)
    (data / "features-text-x.pt").write_bytes(b"a cache: not packed")
    carry = tmp_path / "carry"
    env = stub_env(tmp_path, DATA_ROOT=str(tmp_path / "data"), PART_SIZE="8K", WHEELS="pandas==2.3.3 recbole")

    packed = run(PACK, str(carry), env=env)
    assert packed.returncode == 0, packed.stderr
    download = pip_calls(tmp_path)[0]
    assert download[0] == "download" and "--no-deps" in download and download[-2:] == ["pandas==2.3.3", "recbole"]
    assert download[download.index("--python-version") + 1] == "3.12"
    parts = sorted(p.name for p in carry.glob("carry.tar.part-*"))
    assert len(parts) >= 3 and all((carry / p).stat().st_size <= 8192 for p in parts)
    assert sorted(line.split()[1] for line in (carry / "SHA256SUMS").read_text().splitlines()) == parts
    assert f"call {len(parts)}: carry" in packed.stdout

    # The device after the first call: one part there, the command is not run.
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(carry / "SHA256SUMS", device)
    shutil.copy(carry / parts[0], device)
    denv = {**env, "CARRY": str(device), "SITE": str(device / "site"), "DATA_ROOT": str(tmp_path / "devdata")}
    command = ["sh", "-c", 'echo "ran with $PYTHONPATH $RECBOLE_PERPEFT_ALLOW_NUMPY2"']
    early = run(ENV, *command, env=denv)
    assert early.returncode == 3 and "ran with" not in early.stdout
    assert f"still to carry (one call each, with SHA256SUMS): {' '.join(parts[1:])}" in early.stderr

    # All parts, one damaged: refused; carried again: unpacked, installed, the command runs.
    for part in parts[1:]:
        shutil.copy(carry / part, device)
    (device / parts[-1]).write_bytes(b"damaged")
    assert run(ENV, *command, env=denv).returncode == 4
    shutil.copy(carry / parts[-1], device)
    done = run(ENV, *command, env=denv)
    assert done.returncode == 0, done.stderr
    assert f"ran with {device / 'site'}:{REPO_ROOT}" in done.stdout and done.stdout.rstrip().endswith(" 1")
    assert "gpu_env: Python" in done.stdout
    install = pip_calls(tmp_path)[-1]
    assert install[:4] == ["install", "--quiet", "--no-deps", "--target"]
    assert sorted(os.path.basename(w) for w in install if w.endswith(".whl")) == [
        "pandas-0.1-py3-none-any.whl", "recbole-0.1-py3-none-any.whl"]  # fmt: skip
    unpacked = tmp_path / "devdata" / "amazon-scientific"
    assert {p.name: p.read_bytes() for p in unpacked.iterdir()} == originals
    assert not (device / "unpacked").exists()

    # A later call finds it installed and goes straight to the command.
    n = len(pip_calls(tmp_path))
    again = run(ENV, *command, env=denv)
    assert again.returncode == 0 and "ran with" in again.stdout and len(pip_calls(tmp_path)) == n


def test_pack_refuses_a_dataset_not_prepared(tmp_path):
    env = stub_env(tmp_path, DATA_ROOT=str(tmp_path / "nothing"))
    done = run(PACK, str(tmp_path / "carry"), env=env)
    assert done.returncode == 2 and "prepare the dataset first" in done.stderr
    assert not list((tmp_path / "carry").glob("carry.tar.part-*"))
