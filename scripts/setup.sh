#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: CPU torch, build tools, and xvalid as an
# editable install that rebuilds changed C++ on the next `xvalid` call (docs/dev-loop.md).
# Idempotent: a second run with an unchanged pyproject.toml only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${XVALID_VENV:-.venv}
STAMP="$VENV/.xvalid-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import xvalid._core" 2>/dev/null; then
  exit 0
fi

echo "setup: creating $VENV and installing xvalid (first run takes a minute or two)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# The CPU build of torch, pinned: an unpinned torch can pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
# Build tools in the venv itself: the editable install builds without isolation so that
# rebuild-on-import can find them later.
"${pip[@]}" install "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" ninja cmake
"${pip[@]}" install --no-build-isolation \
  -Ceditable.rebuild=true -Ceditable.verbose=false -Cbuild-dir=build/editable \
  -e ".[test]"
"$VENV/bin/python" -c "import xvalid._core" || { echo "setup: the C++ module did not build" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: done ($VENV)" >&2
