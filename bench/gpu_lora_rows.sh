#!/usr/bin/env bash
# The LoRA rows of the paper's Table 2 on amazon-scientific at the paper's schedule (every MiniLM layer
# adapted, single-stage rows 30 epochs, PerPEFT 10 + 20), on one GPU: one process per (job, seed), side by
# side. A LoRA step on one GPU is launch-bound (MiniLM's kernels on ~240 titles are tiny), so processes
# beside each other fill the GPU instead of queueing.
#
#   [SEEDS="2024 2025 2026"] [JOBS="GlobalPEFT PerPEFT PerPEFT2soft"] [PEFT=LORA] [DEADLINE=seconds] \
#       bash bench/gpu_lora_rows.sh RESULT_DIR [--key=value ...]
#
# PEFT=IA3 gives the (IA)3 rows the same way (run files GlobalPEFT-IA3-seed<s>.json, ...).
#
# Jobs: GlobalPEFT (30 epochs); PerPEFT (the paper's 8 groups); PerPEFT2soft (2 groups, each user scored by
# both: --n_groups=2 --soft_groups=2). Each (job, seed) writes RESULT_DIR/<job>-<seed>/ (reproduce's run
# folder, its own checkpoints) and RESULT_DIR/<job>-<seed>.log. Compare them where they are with
# run_recbole_perpeft.py --model=GlobalPEFT,PerPEFT --seeds=... --runs_from=GlobalPEFT=RESULT_DIR/GlobalPEFT-2024/runs/
# GlobalPEFT-LORA,GlobalPEFT=RESULT_DIR/GlobalPEFT-2025/runs/GlobalPEFT-LORA,... (a name given again adds a seed's
# folder), or copy the run JSONs into one reproduce folder and run the reproduce command there (it reuses them).
# DEADLINE stops every process after that many seconds (0: none): a run stopped before its end is lost (its
# log keeps the epochs it did); runs already finished are reused when the same command runs again.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_lora_rows.sh RESULT_DIR [--key=value ...]" >&2; exit 2; }
dir=$1
shift
mkdir -p "$dir"
pids=()
common=(--table=2 --dataset=amazon-scientific --peft="${PEFT:-LORA}" --stage1_epochs=10 --stage2_epochs=20)
for job in ${JOBS:-GlobalPEFT PerPEFT PerPEFT2soft}; do
  case $job in
    GlobalPEFT) rows=(--rows=GlobalPEFT) ;;
    PerPEFT) rows=(--rows=PerPEFT) ;;
    PerPEFT2soft) rows=(--rows=PerPEFT --n_groups=2 --soft_groups=2) ;;
    *) echo "unknown job '$job' (GlobalPEFT, PerPEFT, PerPEFT2soft)" >&2; exit 2 ;;
  esac
  for seed in ${SEEDS:-2024 2025 2026}; do
    # One torch thread each: the CPU side of a step is Python dispatch, and 16 cores serve 9 processes.
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout "${DEADLINE:-0}" "$PYTHON" -m recbole_perpeft.reproduce \
      "${common[@]}" "${rows[@]}" --seeds="$seed," --result_dir="$dir/$job-$seed" \
      --checkpoint_dir="$dir/$job-$seed/saved" "$@" >"$dir/$job-$seed.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
