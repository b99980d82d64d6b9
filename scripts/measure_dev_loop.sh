#!/usr/bin/env bash
# Measures the C++ dev loop (docs/dev-loop.md): touch one kernel file, then
# `xvalid compare tiny.json -q` (rebuild + verdict, the reference from the reference cache);
# the same with nothing changed, and with --no-cache (the reference computed: torch imported).
# Then where the time of one loop goes: the rebuild alone, Python's imports, the compare alone.
# Usage: bash scripts/measure_dev_loop.sh [RUNS]   (needs bash scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XVALID_CACHE_DIR=$work/cache   # a cache of its own: the user's is not touched
model=$work/tiny.json
.venv/bin/xvalid generate -o "$model" > /dev/null
.venv/bin/xvalid compare "$model" -q > /dev/null   # build anything pending, fill the cache
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)${PYTHONDONTWRITEBYTECODE:+; PYTHONDONTWRITEBYTECODE is set, so the modules of xvalid are compiled on every run unless .pyc files exist}"

seconds() {  # seconds COMMAND...: the wall time of one run, stdout discarded
  local start
  start=$(date +%s.%N)
  "$@" > /dev/null
  echo "$(date +%s.%N) - $start" | bc
}

for label in "touch csrc/kernel/fast/simd_ops.cpp (fast kernel's element-wise ops, two ISA variants)" \
             "touch csrc/kernel/fast/simd_attention.cpp (fast kernel's attention, two ISA variants)" \
             "touch csrc/kernel/fast/fast_kernel.cpp (fast kernel's op table)" \
             "touch csrc/kernel/fast/matmul_avx2.cpp (the AVX2 matmul micro-kernel)" \
             "touch csrc/kernel/ops.cpp (clear kernel)" \
             "touch csrc/kernel/transformer.cpp (the forward)" \
             "nothing changed" "nothing changed, --no-cache (torch imported)"; do
  file=$(echo "$label" | sed -n 's/^touch \([^ ]*\).*/\1/p')
  flags=()
  [[ $label == *--no-cache* ]] && flags=(--no-cache)
  times=()
  for _ in $(seq "$runs"); do
    [[ -n $file ]] && touch "$file"
    times+=("$(seconds .venv/bin/xvalid compare "$model" -q "${flags[@]}")")
  done
  printf '%s, then compare -q: %s s\n' "$label" "$(printf '%.2f ' "${times[@]}")"
done

echo "where the time goes (touch csrc/kernel/fast/simd_ops.cpp; each part alone, median of $runs):"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
rebuild=() imports=() python=()
for _ in $(seq "$runs"); do
  touch csrc/kernel/fast/simd_ops.cpp
  rebuild+=("$(seconds .venv/bin/python -c 'import xvalid._core')")
  imports+=("$(seconds .venv/bin/python -c 'import xvalid.cli, xvalid.compare, xvalid.report, xvalid.progress')")
  python+=("$(seconds .venv/bin/xvalid compare "$model" -q)")
done
echo "  rebuild + import of the C++ module:                 $(median "${rebuild[@]}") s"
echo "  Python start and xvalid's imports:                  $(median "${imports[@]}") s"
echo "  compare -q with nothing to rebuild (reference cached): $(median "${python[@]}") s"
echo "  (compare starts the rebuild in a thread as soon as it knows it needs the C++ module, and"
echo "   reads the model file and the cached reference meanwhile)"
