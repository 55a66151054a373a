#!/usr/bin/env bash
# The LoRA speed bench on a GPU, as one command: bench/lora_speed.py --device=cuda, with the GPU's memory
# printed before and after (nvidia-smi; the table has the allocator's peak per precision).
#
#   bash bench/gpu_check.sh [lora_speed.py options, e.g. --tiny, --setups=clip, --steps=5]
#
# Where torch sees no CUDA device it says so and runs the same bench on the CPU, so that the script itself
# can be tested anywhere (tests/test_lora_speed_bench.py runs it with --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

gpu_memory() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPU memory ($1), used / total:"
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  elif [ "$device" = cuda ]; then
    echo "GPU memory ($1), free / total bytes: $("$PYTHON" -c 'import torch; print(*torch.cuda.mem_get_info())')"
  else
    echo "GPU memory ($1): no GPU on this machine"
  fi
}

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  device=cuda
else
  device=cpu
  echo "gpu_check: torch sees no CUDA device here; running the bench on the CPU instead"
fi
gpu_memory before
"$PYTHON" bench/lora_speed.py --device="$device" "$@"
gpu_memory after
