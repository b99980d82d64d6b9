#!/usr/bin/env bash
# ASan + UBSan: builds the kernels, the loader, the Python module, the runner and the C++ tests
# with -fsanitize=address,undefined (build/asan), then runs
#   1. the C++ tests (ctest): every fast op against the clear one at tile edges, AVX2 and portable;
#   2. the runner, both kernels, on generated models whose sizes are not multiples of any tile
#      (hidden 72, head_dim 6, vocab 131, sequences 1, 3 and 33, batch 3, padding);
#   3. the runner on weights stored as float16, bfloat16 and int8, both containers;
#   4. the binding tests (tests/test_core_bindings.py) against the sanitized module.
# Any sanitizer report fails the script. CI runs it (.ci/run); docs/cpp.md has the recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="$PWD/.venv"
export PATH="$venv/bin:$PATH"
build=build/asan
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DXVALID_SANITIZE=ON \
      -DPython_EXECUTABLE="$venv/bin/python" > "$build.configure.log" 2>&1 \
  || { cat "$build.configure.log" >&2; exit 1; }
cmake --build "$build" -- -j2 > "$build.build.log" 2>&1 || { tail -50 "$build.build.log" >&2; exit 1; }
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

echo "sanitize: C++ tests" >&2
ctest --test-dir "$build" --output-on-failure

echo "sanitize: the runner on tile-edge models" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export XVALID_CACHE_DIR="$tmp/cache"  # compare's reference cache: not the user's
for flags in "--hidden 72 --heads 12 --kv-heads 4 --vocab 131 --seq-len 33 --batch-size 3 --pad 2" \
             "--hidden 72 --heads 12 --kv-heads 3 --vocab 131 --seq-len 3 --batch-size 3 --pad 1" \
             "--hidden 72 --heads 12 --kv-heads 12 --vocab 131 --seq-len 1 --batch-size 3 --pad 0" \
             "--hidden 64 --heads 8 --kv-heads 2 --vocab 128 --seq-len 70 --batch-size 2 --pad 2"; do
  # shellcheck disable=SC2086
  xvalid generate $flags --layers 2 --max-pos 80 -o "$tmp/m.json" > /dev/null
  for kernel in fast clear; do
    for threads in 1 2; do
      "$build/xvalid-run" "$tmp/m.json" "$tmp/out" --intermediates --kernel "$kernel" --threads "$threads" > /dev/null
    done
  done
  xvalid compare "$tmp/m.json" --backends torch -q \
    --engine "$build/xvalid-run {model} {out} --intermediates --kernel fast" > /dev/null
done

echo "sanitize: the runner on typed weights (float16, bfloat16, int8; JSON and safetensors)" >&2
xvalid generate --hidden 72 --heads 12 --kv-heads 4 --vocab 131 --seq-len 9 --batch-size 3 --pad 2 \
  --layers 2 --max-pos 16 -o "$tmp/m.json" > /dev/null
"$venv/bin/python" - "$tmp" <<'PY'
import sys
from xvalid.dtypes import store_weights
from xvalid.modelfile import read_model, write_model
mf = read_model(f"{sys.argv[1]}/m.json")
for weight_dtype, block_size in (("float16", 32), ("bfloat16", 32), ("int8", 32), ("int8", 5)):
    typed = store_weights(mf, weight_dtype, block_size)
    for container in ("json", "safetensors"):
        write_model(typed, f"{sys.argv[1]}/typed-{weight_dtype}-{block_size}.{container}",
                    progress=False, container=container)
PY
for model in "$tmp"/typed-*; do
  for kernel in fast clear; do
    "$build/xvalid-run" "$model" "$tmp/out" --intermediates --kernel "$kernel" --threads 2 --decode 3 > /dev/null
  done
done

echo "sanitize: binding tests against the sanitized module" >&2
# A copy of the package with the sanitized _core, imported without the editable install's
# redirect (python -S: no .pth files), the ASan runtime preloaded with libstdc++ (Python itself
# is not linked to it, and ASan must see it to intercept C++ throws; Python is not
# instrumented, so its own allocations are not leak-checked). -s: a sanitizer report goes to
# the terminal, not into pytest's captured output.
mkdir -p "$tmp/pkg"
cp -r python/xvalid "$tmp/pkg/xvalid"
cp "$build"/_core*.so "$tmp/pkg/xvalid/"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 PYTHONPATH="$tmp/pkg:$site" \
  XVALID_RUN="$PWD/$build/xvalid-run" \
  "$venv/bin/python" -S -m pytest tests/test_core_bindings.py -q -s -p no:cacheprovider -x
echo "sanitize: clean" >&2
