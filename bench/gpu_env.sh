#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: unpack what bench/gpu_pack.sh packed, once every part
# has been carried, then run COMMAND with the wheels on PYTHONPATH:
#
#   bash bench/gpu_env.sh [COMMAND ...]     e.g. bash bench/gpu_env.sh bash bench/gpu_lora_rows.sh runs/lora
#
# - Parts missing (not carried yet): says which are here and exits 3, COMMAND not run; carry the next part.
# - All parts here: checks their SHA256SUMS, installs the wheels with --no-deps into SITE (default
#   dataset/gpu_carry/site: ignored by git, so it stays for later calls, which skip this step) and the
#   datasets into DATA_ROOT (default dataset; files already there are kept).
# - Then prints the versions it runs with and runs COMMAND under PYTHONPATH=SITE:. with
#   RECBOLE_PERPEFT_ALLOW_NUMPY2=1: the device images keep numpy 2, whose scipy a downgrade would break
#   (recbole_perpeft/compat.py restores the aliases RecBole 1.2.1 reads).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-dataset/gpu_carry}
SITE=${SITE:-$CARRY/site}
DATA_ROOT=${DATA_ROOT:-dataset}
PIP=${PIP:-python -m pip}
PYTHON=${PYTHON:-python}

if [ ! -f "$SITE/.installed" ]; then
  if [ ! -f "$CARRY/SHA256SUMS" ]; then
    echo "gpu_env: no $CARRY/SHA256SUMS: run bench/gpu_pack.sh here and carry its parts with SHA256SUMS" >&2
    exit 3
  fi
  missing=$(cd "$CARRY" && awk '{print $2}' SHA256SUMS | while read -r part; do [ -f "$part" ] || echo "$part"; done)
  if [ -n "$missing" ]; then
    echo "gpu_env: parts here: $(cd "$CARRY" && ls carry.tar.part-* 2>/dev/null | tr '\n' ' ')" >&2
    echo "gpu_env: still to carry (one call each, with SHA256SUMS): $(echo "$missing" | tr '\n' ' ')" >&2
    exit 3
  fi
  if ! (cd "$CARRY" && sha256sum --check --quiet SHA256SUMS); then
    echo "gpu_env: a part in $CARRY does not match SHA256SUMS: carry it again" >&2
    exit 4
  fi
  unpacked="$CARRY/unpacked"
  rm -rf "$unpacked" && mkdir -p "$unpacked" "$SITE" "$DATA_ROOT"
  cat "$CARRY"/carry.tar.part-* | tar -x -C "$unpacked"
  # shellcheck disable=SC2086  # PIP is a word list
  $PIP install --quiet --no-deps --target "$SITE" "$unpacked"/wheels/*.whl
  if [ -d "$unpacked/dataset" ]; then
    cp -rn "$unpacked/dataset/." "$DATA_ROOT/"
  fi
  rm -rf "$unpacked"
  touch "$SITE/.installed"
fi

export PYTHONPATH="$(cd "$SITE" && pwd):$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RECBOLE_PERPEFT_ALLOW_NUMPY2=1
"$PYTHON" - <<'EOF'
import sys

import numpy, pandas, recbole, torch, transformers, peft  # noqa: E401
from recbole_perpeft import compat

compat.check_environment()
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"gpu_env: Python {sys.version.split()[0]}, torch {torch.__version__} ({cuda}), numpy {numpy.__version__}, "
      f"pandas {pandas.__version__}, recbole {recbole.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}", flush=True)
EOF
if [ $# -gt 0 ]; then
  exec "$@"
fi
