#!/usr/bin/env bash
# The main job end to end: set up, generate a seeded model, compare torch vs C++, print the verdict.
# Extra arguments go to `xvalid generate` (e.g. --preset minimind2-small --seq-len 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/xvalid generate --hidden 64 --layers 2 "$@" -o out/model.json
.venv/bin/xvalid compare out/model.json --decode 2 --plot out/divergence.png --json out/report.json
