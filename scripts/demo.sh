#!/usr/bin/env bash
# The main job end to end: set up, generate a seeded model, compare torch vs C++, print the verdict.
# Arguments go to `xvalid generate` (default: --hidden 64 --layers 2; e.g.
# `bash scripts/demo.sh --preset minimind2-small --seq-len 32`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
[ $# -gt 0 ] || set -- --hidden 64 --layers 2
.venv/bin/xvalid generate "$@" -o out/model.json
.venv/bin/xvalid compare out/model.json --decode 2 --plot out/divergence.png --json out/report.json
