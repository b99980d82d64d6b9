#!/usr/bin/env bash
# Measures the C++ dev loop (docs/dev-loop.md): touch one kernel file, then
# `xvalid compare tiny.json -q` (rebuild + verdict); and the same with nothing changed.
# Usage: bash scripts/measure_dev_loop.sh [RUNS]   (needs bash scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
model=$(mktemp -d)/tiny.json
.venv/bin/xvalid generate -o "$model" > /dev/null
.venv/bin/xvalid compare "$model" -q > /dev/null   # build anything pending first
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)"
for label in "touch csrc/kernel/ops.cpp (clear kernel)" "touch csrc/kernel/fast/simd_ops.cpp (fast kernel)" \
             "touch csrc/kernel/transformer.cpp (the forward)" "nothing changed"; do
  file=$(echo "$label" | sed -n 's/^touch \([^ ]*\).*/\1/p')
  times=()
  for _ in $(seq "$runs"); do
    [[ -n $file ]] && touch "$file"
    start=$(date +%s.%N)
    .venv/bin/xvalid compare "$model" -q > /dev/null
    times+=("$(echo "$(date +%s.%N) - $start" | bc)")
  done
  printf '%s, then compare -q: %s s\n' "$label" "$(printf '%.2f ' "${times[@]}")"
done
