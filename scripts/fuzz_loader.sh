#!/usr/bin/env bash
# Fuzzes the C++ model-file loader (and a forward pass on small accepted files) with
# libFuzzer + AddressSanitizer + UndefinedBehaviorSanitizer. From a fresh clone:
#
#   bash scripts/fuzz_loader.sh            # 60 s
#   bash scripts/fuzz_loader.sh 1800       # 30 minutes
#   bash scripts/fuzz_loader.sh 600 -jobs=2 -workers=2   # extra arguments go to libFuzzer
#
# Installs clang (apt-get, as root) and the nlohmann-json headers if missing, builds
# build/fuzz/fuzz_loader, and runs it at low priority on one worker over the seeds in
# csrc/fuzz/seeds, with csrc/fuzz/json.dict. The growing corpus is kept in
# build/fuzz/corpus (a rerun continues from it); a crashing input is written to
# build/fuzz/crashes/ and the script exits non-zero. Every crash found becomes a regression
# file in tests/data/hostile/ (docs/cpp.md, "Fuzzing the loader").
set -euo pipefail

seconds=${1:-60}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/build/fuzz"
mkdir -p "$out/corpus" "$out/crashes"

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "fuzz_loader: please install $* (needs clang with libFuzzer)" >&2
        exit 2
    fi
    echo "fuzz_loader: installing $*" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# clang with libFuzzer and the sanitizer runtimes: try a one-line harness
probe() {
    echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
        clang++ -x c++ - -fsanitize=fuzzer,address,undefined -o "$out/probe" >/dev/null 2>&1
}
if ! command -v clang++ >/dev/null; then apt_install clang; fi
if ! probe; then
    major=$(clang++ -dumpversion | cut -d. -f1)
    apt_install "libclang-rt-$major-dev"
    probe || { echo "fuzz_loader: clang++ cannot build a libFuzzer binary" >&2; exit 2; }
fi

# nlohmann-json headers: the venv's (scripts/setup.sh), the system's, else Debian's package
json_include=""
for candidate in "$repo"/.venv/lib/python3*/site-packages/nlohmann_json/include /usr/include /usr/local/include; do
    if [ -f "$candidate/nlohmann/json.hpp" ]; then json_include=$candidate; break; fi
done
if [ -z "$json_include" ]; then
    apt_install nlohmann-json3-dev
    json_include=/usr/include
fi
include_json=(-isystem "$json_include")
case $json_include in  # a default directory again as -isystem would break #include_next
    /usr/include | /usr/local/include) include_json=() ;;
esac

echo "fuzz_loader: building $out/fuzz_loader (clang++ $(clang++ -dumpversion), ASan + UBSan)" >&2
cmake -DXVALID_SOURCE_DIR="$repo" -DXVALID_GENERATED_DIR="$out/generated" -P "$repo/cmake/FormatSpec.cmake"
clang++ -std=c++17 -O1 -g -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I "$repo/csrc" -I "$out/generated" "${include_json[@]}" \
    "$repo/csrc/fuzz/fuzz_loader.cpp" "$repo/csrc/io/model_file.cpp" "$repo/csrc/io/base64.cpp" \
    "$repo/csrc/io/forward_memory.cpp" \
    "$repo/csrc/kernel/ops.cpp" "$repo/csrc/kernel/transformer.cpp" \
    -o "$out/fuzz_loader"

echo "fuzz_loader: running for $seconds s; corpus $out/corpus, crashes in $out/crashes/" >&2
cd "$out"
exec nice -n 19 ./fuzz_loader -max_total_time="$seconds" -dict="$repo/csrc/fuzz/json.dict" \
    -max_len=32768 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/crashes/" "$@" "$out/corpus" "$repo/csrc/fuzz/seeds"
